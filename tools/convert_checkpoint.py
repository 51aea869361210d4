"""Convert a checkpoint of a run: to the HuggingFace format, or to DeepSpeed's universal format so the
run resumes at another world size (other number of GPUs or nodes, other ZeRO partitioning).

    python tools/convert_checkpoint.py runs/tiny --to hf [--tag global_step100] [--output DIR] [--tokenizer DATA]
    python tools/convert_checkpoint.py runs/tiny --to universal [--tag global_step100]

`--to hf` is tools/export_checkpoint.py (plain, ZeRO 1-3, pipeline and universal checkpoints of a
pipeline.pretrain run to safetensors; finetune and compress runs write RUN/hf themselves).
`--to universal` runs DeepSpeed's `ds_to_universal` on RUN/checkpoints/TAG, writes the result as
RUN/checkpoints/TAG_universal and points `latest` at it. Rerun the stage's command with the new
world size: it sees the universal checkpoint, tells DeepSpeed to load it as one, and continues from
the same step and data position (keep train_batch_size the same, e.g. by giving it in the JSON and
setting gradient_accumulation_steps to "auto"). Per-rank RNG states do not carry over to another
world size; the data order does, since it does not depend on the number of ranks.

A ZeRO-0 checkpoint (fp32, or bf16 without DeepSpeed's bf16 optimizer) has no per-rank optimizer shards:
weights and Adam state are whole in mp_rank_00_model_states.pt, which every rank loads, so ds_to_universal
has nothing to convert and such a run resumes at another data-parallel size as it is (same command, other
number of ranks, same train_batch_size).
`--to hf` reads any tag, a universal one too (`latest` names it after `--to universal`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # export_checkpoint beside this file

from pipeline.cli import run_main  # noqa: E402
from pipeline.training import is_universal_checkpoint, latest_tag  # noqa: E402


def to_universal(run: str, tag: str | None) -> str:
    checkpoint_dir = os.path.join(run, "checkpoints")
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None or not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        raise FileNotFoundError(f"{checkpoint_dir}: no checkpoint {tag or '(no latest)'}; give one of its "
                                "global_stepN folders with --tag")
    folder = os.path.join(checkpoint_dir, tag)
    if is_universal_checkpoint(folder):
        raise ValueError(f"{folder} is already a universal checkpoint: rerun the stage at the new world size")
    if not any(name.endswith("optim_states.pt") for name in os.listdir(folder)):
        raise ValueError(f"{folder} has no per-rank optimizer shards (*optim_states.pt): a ZeRO-0 checkpoint keeps "
                         "weights and optimizer state whole in mp_rank_*_model_states.pt, which DeepSpeed's universal "
                         "format does not convert, and needs no conversion: rerun the stage with the new "
                         "number of ranks as it is (keep train_batch_size, set gradient_accumulation_steps to \"auto\")")
    out_tag = f"{tag}_universal"
    out, tmp = os.path.join(checkpoint_dir, out_tag), os.path.join(checkpoint_dir, f".{out_tag}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           os.path.join(checkpoint_dir, tag), "--output_folder", tmp, "--inject_missing_state"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"convert_checkpoint: error: ds_to_universal failed on {checkpoint_dir}/{tag}:\n{r.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    with open(os.path.join(checkpoint_dir, "latest.tmp"), "w", encoding="utf-8") as f:
        f.write(out_tag)
    os.replace(os.path.join(checkpoint_dir, "latest.tmp"), os.path.join(checkpoint_dir, "latest"))
    print(f"converted {checkpoint_dir}/{tag} -> {out}; `latest` names it: rerun the stage at the new world size")
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (with args.json and checkpoints/)")
    p.add_argument("--to", choices=["hf", "universal"], required=True, help="the target format")
    p.add_argument("--tag", help="checkpoint tag, e.g. global_step100 (default: the one `latest` names)")
    p.add_argument("--output", help="with --to hf: the output folder (default: RUN/hf)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="with --to hf: weight dtype")
    p.add_argument("--tokenizer", help="with --to hf: the run's prepared data folder, when args.json's path is not "
                   "found from here (see tools/export_checkpoint.py)")
    p.add_argument("--model", help="with --to hf: the run's model config JSON or HF folder, when it moved")
    args = p.parse_args(argv)
    if args.to == "universal":
        return to_universal(args.run, args.tag)
    import export_checkpoint

    forwarded = [args.run, "--dtype", args.dtype]
    for flag, value in (("--tag", args.tag), ("--output", args.output), ("--tokenizer", args.tokenizer),
                        ("--model", args.model)):
        forwarded += [flag, value] if value else []
    return export_checkpoint.main(forwarded)


if __name__ == "__main__":
    run_main(main, "convert_checkpoint")
