"""Run a peer baseline script with this pipeline's bf16 kernels for CPUs without native bf16.

    deepspeed --num_gpus 2 tools/peer_with_our_kernels.py ../shared/peers/hf_trainer_baseline.py \
        --model-config CONFIG.json --deepspeed-config ds_configs/zero2.json --seq-length 256 --steps 10

On a CPU without AVX512-BF16/AMX, `pipeline.pretrain` computes its bf16 matrix products with fp32 kernels
(pipeline/models/cpu_bf16.py) while the peers run torch's slow generic bf16 GEMM, so ours / peer in bf16
measures that kernel choice as much as the training step. This wrapper gives the peer's model the same kernels
(`use_fp32_kernels_for_bf16` on every model `AutoModelForCausalLM.from_config` builds), then runs the peer
unchanged, so that tools/benchmark.py can also report the ratio at equal kernels. tools/benchmark.py runs it only
on such a CPU: with native bf16 the same function would give the peer only the short-attention rule.
"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import AutoModelForCausalLM  # noqa: E402

from pipeline.models.cpu_bf16 import use_fp32_kernels_for_bf16  # noqa: E402


def main() -> None:
    # The deepspeed launcher puts --local_rank=N before the script's own arguments: hand it on to the peer.
    local_rank = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
    rest = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if not rest or not os.path.isfile(rest[0]):
        sys.exit(f"usage: {sys.argv[0]} PEER_SCRIPT.py [its arguments]  (not a file: {rest[:1]})")
    build = AutoModelForCausalLM.from_config  # a bound classmethod

    def from_config(*args, **kwargs):
        return use_fp32_kernels_for_bf16(build(*args, **kwargs))

    AutoModelForCausalLM.from_config = from_config
    sys.argv = [*rest, *local_rank]  # the peer sees its own name and arguments
    runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
