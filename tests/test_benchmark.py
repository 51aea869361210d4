"""tools/benchmark.py's arithmetic: the FLOP counter against hand counts, the ceiling's GEMM list against the
counter, and which shapes, layouts and dtypes the ceiling measures. No timing is asserted."""
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import benchmark  # noqa: E402

from pipeline.models import load_model_config  # noqa: E402
from pipeline.monitor import training_flops_per_token  # noqa: E402

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 172, "max_position_embeddings": 64, "tie_word_embeddings": True}
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}
BERT = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "max_position_embeddings": 64}


def config_of(tmp_path, fields):
    import json

    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    return load_model_config(str(path), 100, {})[0]


def test_flops_per_token_hand_count_llama(tmp_path):
    # head_dim 16; q, o: 64x64 each; k, v: 64 x (2 kv heads x 16) each; gated MLP 3 x 64 x 172; tied head 100 x 64.
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 172  # 12288 + 33024 = 45312
    matmul_params = 2 * per_layer + 100 * 64  # 97024
    attention = 12 * 2 * 16 * 64  # layers x seq x hidden, QK^T and AV, forward + backward
    assert training_flops_per_token(config_of(tmp_path, LLAMA), 16) == 6 * matmul_params + attention == 606720


def test_flops_per_token_hand_count_gpt2(tmp_path):
    per_layer = 4 * 64 * 64 + 2 * 64 * 256  # c_attn (3h) + c_proj (h); c_fc and c_proj of the 4h MLP
    assert training_flops_per_token(config_of(tmp_path, GPT2), 16) == 6 * (2 * per_layer + 100 * 64) + 12 * 2 * 16 * 64


@pytest.mark.parametrize("fields", [LLAMA, GPT2, BERT], ids=["llama", "gpt2", "bert"])
def test_ceiling_gemms_are_the_counted_flops(tmp_path, fields):
    """The GEMMs the ceiling times are exactly the FLOPs the counter charges to a step (the model is
    enumerated on the meta device, so embeddings are out and a tied or masked-LM head is in)."""
    config = config_of(tmp_path, fields)
    micro, seq = 2, 16
    gemms = benchmark.step_gemms(config, micro, seq)
    assert benchmark.gemm_flops(gemms) == training_flops_per_token(config, seq) * micro * seq


def test_step_gemms_layouts(tmp_path):
    config = config_of(tmp_path, LLAMA)
    gemms = benchmark.step_gemms(config, micro=2, seq=16)
    n = 2 * 16
    # The gate projection (64 -> 172): forward x W^T, backward dY W and dY^T X.
    assert {("nt", 1, n, 64, 172), ("nn", 1, n, 172, 64), ("tn", 1, 172, n, 64)} <= set(gemms)
    # The tied output head is a matmul too.
    assert ("nt", 1, n, 64, 100) in gemms
    # Attention per layer: 2 x 4 heads batches; scores (16 x 16 x 16) and values, forward + backward = 3 each.
    assert gemms.count(("nt", 8, 16, 16, 16)) == 3 * 2 and gemms.count(("nn", 8, 16, 16, 16)) == 3 * 2


@pytest.mark.parametrize("kernel,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                          ("bf16-via-fp32", torch.bfloat16)])
def test_gemm_operands_shapes_layouts_dtypes(kernel, dtype):
    a, w = benchmark.gemm_operands("nt", 1, 8, 4, 6, kernel)
    assert a.shape == (8, 4) and w.shape == (4, 6) and a.dtype == w.dtype == dtype
    assert a.is_contiguous() and w.t().is_contiguous()  # W stored (out, in), used transposed
    a, w = benchmark.gemm_operands("tn", 1, 8, 4, 6, kernel)
    assert a.t().is_contiguous() and w.is_contiguous()
    a, w = benchmark.gemm_operands("nn", 3, 8, 4, 6, kernel)
    assert (a @ w).shape == (3, 8, 6)


def test_time_gemms_counts_every_gemm_once_per_occurrence():
    gemms = [("nn", 1, 8, 4, 6)] * 3 + [("nt", 2, 4, 4, 4)]
    flops, seconds = benchmark._time_gemms(gemms, "fp32", threads=1, min_seconds=0.0)
    assert flops == 3 * 2 * 8 * 4 * 6 + 2 * 2 * 4 * 4 * 4 and seconds > 0


def test_run_kernels():
    fp32 = benchmark.run_kernels("fp32", native_bf16=False)
    assert set(fp32.values()) == {"fp32"} and "hf_trainer_same_kernels" not in fp32  # it would repeat hf_trainer
    emulated = benchmark.run_kernels("bf16", native_bf16=False)
    assert emulated["ours"] == emulated["ours_compile"] == emulated["ours_1p"] == "bf16-via-fp32"  # cpu_bf16.py
    assert set(emulated) == set(benchmark.RUNS)
    assert emulated["hf_trainer"] == emulated["torch_1p"] == "bf16"
    assert emulated["hf_trainer_same_kernels"] == "bf16-via-fp32"
    native = benchmark.run_kernels("bf16", native_bf16=True)
    assert set(native.values()) == {"bf16"} and "hf_trainer_same_kernels" not in native


def test_quick_defaults_and_explicit_flags_win():
    args = benchmark.parse_args(["--quick", "--rounds", "2"])
    assert args.rounds == 2 and args.steps == 4 and args.ab_steps == 6 and args.precisions == ["bf16"]
    assert args.report is None
    full = benchmark.parse_args(["--ranks", "2", "--threads", "3"])
    assert full.precisions == ["bf16", "fp32"] and full.threads == 3 and full.report.endswith("BENCHMARKS.md")
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--sections", "nonsense"])


def test_fp32_variant_disables_half_precision(tmp_path):
    import json

    paths = benchmark.precision_configs(os.path.join(REPO, "ds_configs", "zero2.json"), ["bf16", "fp32"], str(tmp_path))
    assert paths["bf16"].endswith("zero2.json")
    fp32 = json.load(open(paths["fp32"]))
    assert fp32["bf16"] == {"enabled": False} and "fp16" not in fp32
    assert fp32["zero_optimization"]["stage"] == 2


def report_results(**sections):
    machine = {"cpu": "test CPU", "cores": 2, "simd": ["avx2"], "native_bf16": False, "memory_gb": 1.0, "torch": "t",
               "deepspeed": "d", "transformers": "x", "python": "p"}
    return {"machine": machine, "started": "then", "command": "python tools/benchmark.py", "threads": 1, "ranks": 2,
            "load_at_start": [1.0], "load_at_end": [1.0], **sections}


def test_report_gpu_section_and_separately_measured_sections(tmp_path):
    gpu = {"device": "NVIDIA H200", "torch": "2.11", "seq_length": 2048, "micro_batch": 8, "steps": 30,
           "peak_flops": 989e12, "runs": [{"run": "llama-1b_bf16", "parameters": 1.1e9, "precision": "bf16",
                                           "tokens_per_sec": 60000.0, "tflops": 470.0, "mfu": 0.4752}]}
    launch = {"load": [1, 2], "seconds": {"ranks": [17.0], "one": [10.0]}, "median": {"ranks": 17.0, "one": 10.0},
              "commands": ["python tools/benchmark.py --sections launch"], "started": "earlier"}
    path = tmp_path / "report.md"
    benchmark.write_report(str(path), report_results(gpu=gpu, launch=launch, model="tiny", config="c.json"))
    text = path.read_text()
    assert "| llama-1b_bf16 | 1100 M | bf16 | 60,000 | 470 | 47.5% |" in text and "(989 TFLOP/s)" in text
    assert "measured separately, by `python tools/benchmark.py --sections launch` (earlier)" in text
    benchmark.write_report(str(path), report_results())
    assert "## On a GPU\n\nNot measured yet" in path.read_text()


def test_report_throughput_ratios_at_equal_kernels(tmp_path):
    row = {"tokens_per_sec": [100.0], "median": 100.0, "gflops": 1.0, "kernel": "bf16", "processes": 2, "mfu": 0.5}
    bf16 = {"runs": {"ours": row, "hf_trainer": row}, "flops_per_token": 1e6, "ceilings_gflops": {"bf16 x2": 2.0},
            "load": [1, 2], "ours_vs_hf_trainer": 6.0, "ours_compile_vs_hf_trainer": 7.0, "ours_compile_vs_ours": 1.2,
            "ours_1p_vs_torch_1p": 5.0}
    path = tmp_path / "report.md"
    results = report_results(throughput={"bf16": bf16}, model="tiny", config="c.json", seq_length=8, micro_batch=1)
    benchmark.write_report(str(path), results)
    assert "ours / HF Trainer (2 ranks, ZeRO from the JSON): **6.00x** (target >= 1.25x)" in path.read_text()
    assert "at equal matmul kernels" not in path.read_text()  # a native bf16 CPU, or a report from before
    bf16.update(ours_vs_hf_trainer_same_kernels=1.1, ours_compile_vs_hf_trainer_same_kernels=1.3)
    benchmark.write_report(str(path), results)
    assert "`tools/peer_with_our_kernels.py`): ours **1.10x**, with `--compile` **1.30x**" in path.read_text()


@pytest.mark.slow
def test_peer_wrapper_hands_the_peer_its_arguments_and_patches_model_building(tmp_path):
    peer = tmp_path / "peer.py"
    peer.write_text("import sys\nfrom transformers import AutoModelForCausalLM\n"
                    "print('ARGV', sys.argv[1:], type(AutoModelForCausalLM.from_config).__name__)\n")
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "peer_with_our_kernels.py"), "--local_rank=1",
                          str(peer), "--steps", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ARGV ['--steps', '3', '--local_rank=1'] function" in out.stdout  # a bound classmethod before


def test_report_steps_section(tmp_path):
    two = {"world_size": 2, "ms_per_step": {"ours": 100.0, "hf": 125.0}, "ours_vs_hf": 1.25}
    one = {"world_size": 1, "ms_per_step": {"ours": 80.0, "hf": 96.0, "torch": 88.0}, "ours_vs_hf": 1.2,
           "ours_vs_torch": 1.1}
    steps = {"precisions": {"bf16": {"ranks": two, "one_process": one}}, "steps": 40, "load": [1, 2]}
    path = tmp_path / "report.md"
    benchmark.write_report(str(path), report_results(steps=steps, model="tiny", config="c.json", seq_length=8,
                                                     micro_batch=1))
    text = path.read_text()
    assert "| bf16 | 2 | 100.0 | 125.0 | - | **1.25x** | - |" in text
    assert "| bf16 | 1 | 80.0 | 96.0 | 88.0 | **1.20x** | **1.10x** |" in text


def test_step_ab_hf_arm_gets_the_trainers_json(tmp_path, monkeypatch):
    import step_ab

    # The peer's contract (../shared/peers/hf_trainer_baseline.py, not in this repository): trainer_ds_config keeps
    # what decides speed and leaves the optimizer's values and the batch to the Trainer ("auto").
    (tmp_path / "hf_trainer_baseline.py").write_text(
        "import json\n"
        "def trainer_ds_config(path):\n"
        "    cfg = json.load(open(path))\n"
        "    keep = {k: cfg[k] for k in ('zero_optimization', 'bf16', 'gradient_clipping',\n"
        "                                'train_micro_batch_size_per_gpu', 'gradient_accumulation_steps')}\n"
        "    keep['train_batch_size'] = 'auto'\n"
        "    keep['optimizer'] = {'type': 'AdamW', 'params': {'lr': 'auto', 'betas': 'auto', 'eps': 'auto',\n"
        "                                                    'weight_decay': 'auto'}}\n"
        "    return keep\n")
    monkeypatch.setattr(step_ab, "PEERS", str(tmp_path))
    cfg = step_ab.hf_trainer_config(os.path.join(REPO, "ds_configs", "zero2.json"), world=2)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"] == {"enabled": True}
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                            "weight_decay": 0.0}}  # no torch_adam: DeepSpeed's op
    assert cfg["train_batch_size"] == 4 * 1 * 2 and "scheduler" not in cfg and "tensorboard" not in cfg


@pytest.mark.slow
def test_step_ab_one_process_times_every_arm(tmp_path):
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**LLAMA, "vocab_size": 100}))
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "step_ab.py"), "--model-config", str(config),
                          "--deepspeed-config", os.path.join(REPO, "ds_configs", "zero2.json"), "--arms", "ours,torch",
                          "--seq-length", "16", "--steps", "3", "--warmup", "1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    ms = result["ms_per_step"]
    assert set(ms) == {"ours", "torch"} and result["world_size"] == 1 and result["steps"] == 3
    assert result["ours_vs_torch"] == pytest.approx(ms["torch"] / ms["ours"], rel=0.01)
    assert result["tokens_per_sec"]["ours"] == pytest.approx(4 * 16 / (ms["ours"] / 1000), rel=0.01)
    losses = result["first_loss"]  # one model, the same weights: bf16 (ours) against autocast (torch)
    assert losses["ours"] == pytest.approx(losses["torch"], rel=0.01) and losses["ours"] > 3
