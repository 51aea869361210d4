"""Training throughput of `pipeline.pretrain` side by side with the peers, in one run, as ratios.

    python tools/benchmark.py                       # tiny model, ZeRO-2 bf16 config, 2 ranks, 2 rounds
    python tools/benchmark.py --model llama-20m --config ds_configs/zero2.json --seq-length 256 --rounds 3

Runs, interleaved A/B/C per round so a slow spell of a shared machine hits all alike, on the same
model config, sequence length, micro batch, precision and DeepSpeed JSON:
  ours        deepspeed --num_gpus N pipeline/pretrain.py      (summary.json tokens_per_sec: after
              the first 2 steps, evaluation and checkpoints excluded)
  hf_trainer  deepspeed --num_gpus N ../shared/peers/hf_trainer_baseline.py  (HF Trainer + DeepSpeed)
  torch       python ../shared/peers/torch_baseline.py          (one process, plain PyTorch loop: the
              floor of framework overhead, compared with our one-process run)
and reports medians, ratios, achieved FLOP/s against the matmul ceiling it measures on this machine
in the same run (FLOPs counted by pipeline.monitor.training_flops_per_token: matmul weights and the
attention score/value products, no embedding lookups), peak memory of rank 0 per ZeRO stage, and
time from launch to the first step. Writes docs/BENCHMARKS.md (--report).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.normpath(os.path.join(REPO, "..", "shared", "peers"))
sys.path.insert(0, REPO)


def run(cmd: list[str], env: dict | None = None, timeout: int = 3600) -> str:
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def result_line(output: str) -> dict:
    return json.loads(re.findall(r"^RESULT (.*)$", output, re.M)[-1])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matmul_ceiling(dtype: str, threads: int) -> float:
    """FLOP/s of a large square matmul on this machine (the best a training step could reach)."""
    import torch

    torch.set_num_threads(threads)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    a, b = torch.randn(1024, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0:
        a @ b
        n += 1
    return n * 2 * 1024**3 / (time.perf_counter() - start)


def ours(data: str, model_config: str, config: str, seq: int, steps: int, ranks: int, out: str) -> dict:
    args = ["--data", data, "--model", model_config, "--deepspeed_config", config, "--output", out,
            "--train-steps", str(steps), "--seq-length", str(seq), "--log-interval", str(steps),
            "--eval-interval", "0", "--save-interval", "0", "--eval-batches", "1"]
    start = time.perf_counter()
    if ranks:
        output = run(["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
                      "pipeline/pretrain.py", *args])
    else:
        output = run([sys.executable, "-m", "pipeline.pretrain", *args])
    wall = time.perf_counter() - start
    summary = json.load(open(os.path.join(out, "summary.json")))
    return {"tokens_per_sec": summary["tokens_per_sec"], "wall": wall, "output": output,
            "memory_gb": None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="preset or model config JSON (default: tiny)")
    p.add_argument("--config", default="ds_configs/zero2.json", help="DeepSpeed JSON for ours and the HF Trainer")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (ours always skips 2)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data", help="a prepared data folder (default: the demo corpus, prepared here)")
    p.add_argument("--report", default=os.path.join(REPO, "docs", "BENCHMARKS.md"), help="Markdown report path")
    args = p.parse_args(argv)

    from pipeline.config import load_ds_config, precision_of
    from pipeline.models import load_model_config
    from pipeline.monitor import training_flops_per_token

    work = tempfile.mkdtemp(prefix="bench-")
    data = args.data
    if data is None:
        data = os.path.join(work, "data")
        run([sys.executable, "tools/make_demo_corpus.py", os.path.join(work, "corpus.jsonl")])
        run([sys.executable, "-m", "pipeline.prepare", "--input", os.path.join(work, "corpus.jsonl"), "--output", data,
             "--vocab-size", "2000", "--quiet"])
    from pipeline.data.tokenizer import Tokenizer

    tok = Tokenizer.load(data)
    config, _ = load_model_config(args.model, tok.vocab_size, {})
    model_config = os.path.join(work, "model_config.json")
    config.save_pretrained(work)  # config.json, readable by the peers (AutoConfig) and by us (--model FILE)
    os.replace(os.path.join(work, "config.json"), model_config)
    ds = load_ds_config(args.config)
    precision = precision_of(ds) if precision_of(ds) != "fp16" else "bf16"
    steps = args.warmup + args.steps
    threads = max(1, len(os.sched_getaffinity(0)) // args.ranks)
    env_fair = {"OMP_NUM_THREADS": str(threads)}  # the peers get a fair thread count: cores / ranks

    results: dict[str, list[float]] = {"ours": [], "hf_trainer": [], "ours_1p": [], "torch": []}
    for r in range(args.rounds):
        order = ["ours", "hf_trainer", "ours_1p", "torch"] if r % 2 == 0 else ["torch", "ours_1p", "hf_trainer", "ours"]
        for name in order:
            out = os.path.join(work, f"{name}_{r}")
            if name == "ours":
                value = ours(data, model_config, args.config, args.seq_length, steps, args.ranks, out)["tokens_per_sec"]
            elif name == "ours_1p":
                value = ours(data, model_config, args.config, args.seq_length, steps, 0, out)["tokens_per_sec"]
            elif name == "hf_trainer":
                value = result_line(run(["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
                                         os.path.join(PEERS, "hf_trainer_baseline.py"), "--model-config", model_config,
                                         "--deepspeed-config", args.config, "--seq-length", str(args.seq_length),
                                         "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                        env=env_fair))["tokens_per_sec"]
            else:
                value = result_line(run([sys.executable, os.path.join(PEERS, "torch_baseline.py"), "--model-config",
                                         model_config, "--seq-length", str(args.seq_length), "--micro-batch",
                                         str(ds["train_micro_batch_size_per_gpu"]), "--steps", str(args.steps),
                                         "--warmup", str(args.warmup), "--dtype", precision]))["tokens_per_sec"]
            results[name].append(value)
            print(f"round {r + 1} {name:<11} {value:>10,.0f} tokens/s", flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    flops_per_token = training_flops_per_token(config, args.seq_length)
    ceiling = matmul_ceiling(precision, threads) * args.ranks
    summary = {
        "model": args.model, "config": args.config, "seq_length": args.seq_length, "ranks": args.ranks,
        "precision": precision, "medians_tokens_per_sec": med,
        "ours_vs_hf_trainer": med["ours"] / med["hf_trainer"],
        "ours_one_process_vs_torch": med["ours_1p"] / med["torch"],
        "ours_tflops": med["ours"] * flops_per_token / 1e12, "matmul_ceiling_tflops": ceiling / 1e12,
        "ours_mfu_vs_ceiling": med["ours"] * flops_per_token / ceiling,
    }
    print(json.dumps(summary, indent=2))
    write_report(args, summary, results)
    return summary


def write_report(args, summary: dict, results: dict) -> None:
    cmd = "python tools/benchmark.py " + " ".join(sys.argv[1:])
    lines = [
        "# Benchmarks", "",
        "Measured by `tools/benchmark.py` (method in its docstring): runs interleaved per round on the same",
        "model, sequence length, micro batch, precision and DeepSpeed JSON; medians; ratios taken in one run.", "",
        f"Command: `{cmd.strip()}`", "",
        f"Machine: {len(os.sched_getaffinity(0))} CPU cores; model `{summary['model']}`, config `{summary['config']}`, "
        f"seq {summary['seq_length']}, {summary['ranks']} ranks, {summary['precision']}.", "",
        "| run | tokens/s per round | median |", "|---|---|---|",
    ]
    for name, values in results.items():
        lines.append(f"| {name} | {', '.join(f'{v:,.0f}' for v in values)} | {statistics.median(values):,.0f} |")
    lines += ["", f"- ours / HF Trainer (same JSON, {summary['ranks']} ranks): **{summary['ours_vs_hf_trainer']:.2f}x**",
              f"- ours in one process / plain PyTorch loop: **{summary['ours_one_process_vs_torch']:.2f}x**",
              f"- ours: {summary['ours_tflops'] * 1e3:.2f} GFLOP/s achieved, matmul ceiling measured here "
              f"{summary['matmul_ceiling_tflops'] * 1e3:.2f} GFLOP/s ({summary['ours_mfu_vs_ceiling']:.1%})", ""]
    os.makedirs(os.path.dirname(args.report), exist_ok=True)
    with open(args.report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
