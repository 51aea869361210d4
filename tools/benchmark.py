"""Benchmark `pipeline.pretrain` against its peers on this machine, in one run, as ratios; write docs/BENCHMARKS.md.

    python tools/benchmark.py                  # everything (25 min on 2 shared CPU cores)
    python tools/benchmark.py --quick          # every section, smaller (5 min there; writes no report
                                               # unless --report is given)
    python tools/benchmark.py --sections throughput --precisions fp32 --rounds 5

Sections (--sections):
  throughput  tokens/s, interleaved per round (A/B/C/D, then D/C/B/A) so that a slow spell of a shared
              machine hits all runs alike, on the same model config, sequence length, micro batch and
              DeepSpeed JSON, for each precision (--precisions; fp32 is the JSON with bf16/fp16 disabled):
                ours        deepspeed --num_gpus R pipeline/pretrain.py  (summary.json tokens_per_sec: steps
                            after the first 2, evaluation and checkpoints excluded)
                ours_compile  the same with --compile (torch.compile, inductor; the compile happens in
                            the first step, left out)
                hf_trainer  deepspeed --num_gpus R hf_trainer_baseline.py  (HF Trainer + DeepSpeed, same JSON)
                hf_trainer_same_kernels  the same run given our bf16 kernels (tools/peer_with_our_kernels.py);
                            only in bf16 on a CPU without native bf16, where ours and torch's kernels differ
                ours_1p     python -m pipeline.pretrain  (one process, same JSON)
                torch_1p    python torch_baseline.py  (one process, plain PyTorch loop; bf16 = autocast)
              Every process gets the same thread count (--threads, default cores / ranks).
              Achieved FLOP/s = tokens/s x pipeline.monitor.training_flops_per_token (6 x matmul weights,
              output head included, embedding lookups not; + 12 x layers x seq x hidden for the attention
              score and value products), against a matmul ceiling measured in the same round: the GEMMs of
              one training step (forward and backward, at the micro batch and sequence length, each size at
              its fastest operand layout) run alone by as many processes and threads as the run uses, in the
              precision and kernels the run's matmuls use (see KERNELS).
  steps       tools/step_ab.py, --ranks ranks and one process, each precision: ours' training step, the HF Trainer's
              step (its model, its loss, its DeepSpeed JSON) and, in one process, the plain torch loop's, held side
              by side in one process per rank and taken in turn step after step (--ab-steps each), medians of the
              per-step times. Whole runs of a few seconds each measure a shared machine's slow spells as much as
              the step; alternating steps in one process cancel them, so this section says what the step costs
  memory      peak resident memory of each rank (the kernel's VmHWM, polled) for ZeRO 0, 1, 2, 3 and the
              offload configs, 2 ranks, on --memory-model (large enough that model states dominate)
  launch      seconds from starting the command to the end of the first optimizer step (its log line),
              2 ranks and one process
  prepare     tools/bench_prepare.py: pipeline.prepare against prepare_baseline.py, tokens/s

Clean-up: the work folder (unless --keep), and DeepSpeed's /dev/shm/deepspeed_allreduce_buffer_* files of
the ports this run used (the CPU comm op leaves them for runs that do not unlink them, e.g. the HF Trainer's).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.normpath(os.path.join(REPO, "..", "shared", "peers"))
sys.path.insert(0, REPO)

SECTIONS = ("throughput", "steps", "memory", "launch", "prepare")
MEMORY_CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
RUNS = ("ours", "ours_compile", "hf_trainer", "hf_trainer_same_kernels", "ours_1p", "torch_1p")
MULTI_RANK = ("ours", "ours_compile", "hf_trainer", "hf_trainer_same_kernels")

# The kernels a run's matrix products use, per precision. On a CPU without native bf16, ours runs its bf16
# products on fp32 kernels (pipeline/models/cpu_bf16.py); the peers use torch's bf16 GEMM.
KERNELS = {"fp32": "fp32 operands, fp32 GEMM", "bf16": "bf16 operands, torch's bf16 GEMM",
           "bf16-via-fp32": "bf16 operands upcast, fp32 GEMM, bf16 result (pipeline/models/cpu_bf16.py)"}


def run_kernels(precision: str, native_bf16: bool) -> dict[str, str]:
    """The throughput runs at this precision, each with the kernel (a KERNELS key) its matmuls use. The HF
    Trainer with our kernels (tools/peer_with_our_kernels.py) runs only where they differ from torch's: bf16
    on a CPU without native bf16; elsewhere it would repeat the hf_trainer run."""
    if precision == "fp32":
        return {name: "fp32" for name in RUNS if name != "hf_trainer_same_kernels"}
    if native_bf16:
        return {name: "bf16" for name in RUNS if name != "hf_trainer_same_kernels"}
    ours = "bf16-via-fp32"
    return {"ours": ours, "ours_compile": ours, "ours_1p": ours, "hf_trainer": "bf16", "hf_trainer_same_kernels": ours,
            "torch_1p": "bf16"}


# ---------------------------------------------------------------- FLOPs and the matmul ceiling

def linear_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of every matmul weight of the model, output head included (tied or not): the model is
    built on the meta device, so this is exact for any HF architecture (nn.Linear and GPT-2's Conv1D)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from pipeline.models.presets import ENCODERS

    cls = AutoModelForMaskedLM if config.model_type in ENCODERS else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    shapes = []
    for name, module in model.named_modules():
        if "pooler" in name:  # not part of a masked-LM step
            continue
        if isinstance(module, torch.nn.Linear):
            shapes.append((module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D":  # GPT-2: weight (in, out)
            shapes.append(tuple(module.weight.shape))
    return shapes


def step_gemms(config, micro: int, seq: int) -> list[tuple[str, int, int, int, int]]:
    """The matrix products of one training step of one micro-batch as (layout, batch, m, k, n); FLOPs
    2 x batch x m x k x n each. Linear (in -> out), N = micro x seq tokens: forward x W^T (N, in)(in, out),
    backward dY W (N, out)(out, in) and dY^T X (out, N)(N, in). Attention per layer, B x heads batches:
    Q K^T and P V forward, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q backward (T x hd x T each)."""
    n = micro * seq
    gemms = []
    for k_in, k_out in linear_shapes(config):
        gemms += [("nt", 1, n, k_in, k_out), ("nn", 1, n, k_out, k_in), ("tn", 1, k_out, n, k_in)]
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = hidden // heads
    for _ in range(layers):
        gemms += [("nt", micro * heads, seq, head_dim, seq), ("nn", micro * heads, seq, seq, head_dim)] * 3
    return gemms


def count_parameters(spec: str, vocab_size: int) -> int:
    """Parameters of a preset or config (built on the meta device: no memory, no time)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_model_config

    config, _ = load_model_config(spec, vocab_size, {})
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def gemm_flops(gemms) -> float:
    return float(sum(2 * b * m * k * n for _, b, m, k, n in gemms))


def gemm_operands(layout: str, b: int, m: int, k: int, n: int, kernel: str):
    """Operands of one GEMM as the training step holds them: (m, k) and (k, n) (batched when b > 1), in
    the kernel's dtype; "nt" makes the right one a transposed view (x W^T with W stored (n, k)), "tn"
    the left one (dY^T X with dY stored (k, m))."""
    import torch

    dtype = torch.float32 if kernel == "fp32" else torch.bfloat16
    a = torch.randn(b, k, m, dtype=dtype).transpose(1, 2) if layout == "tn" else torch.randn(b, m, k, dtype=dtype)
    w = torch.randn(b, n, k, dtype=dtype).transpose(1, 2) if layout == "nt" else torch.randn(b, k, n, dtype=dtype)
    return (a[0], w[0]) if b == 1 else (a, w)


def _time_gemms(gemms, kernel: str, threads: int, min_seconds: float) -> tuple[float, float]:
    """(FLOPs, seconds) of the step's GEMMs, each distinct size timed alone (repeated until min_seconds) in
    each layout, the fastest layout counted (an emulated bf16 GEMM runs 2 to 17 GFLOP/s here depending on
    which operand is transposed: the ceiling must bound every layout the kernels might use), weighted by
    how often the step runs that size. Runs in a worker process."""
    import collections

    import torch

    from pipeline.models.cpu_bf16 import Fp32KernelsForBf16

    torch.set_num_threads(threads)
    flops = seconds = 0.0
    for (b, m, k, n), count in collections.Counter(g[1:] for g in gemms).items():
        best = float("inf")
        for layout in ("nn", "nt", "tn"):
            a, w = gemm_operands(layout, b, m, k, n, kernel)
            with Fp32KernelsForBf16() if kernel == "bf16-via-fp32" else _nothing():
                torch.matmul(a, w)  # warm up
                reps, start = 0, time.perf_counter()
                while reps == 0 or time.perf_counter() - start < min_seconds:
                    torch.matmul(a, w)
                    reps += 1
                best = min(best, (time.perf_counter() - start) / reps)
        flops += count * 2 * b * m * k * n
        seconds += count * best
    return flops, seconds


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _ceiling_worker(args):
    return _time_gemms(*args)


def matmul_ceiling(gemms, kernel: str, processes: int, threads: int, min_seconds: float = 0.05) -> float:
    """FLOP/s of `processes` concurrent processes with `threads` threads each doing nothing but the step's
    GEMMs with `kernel`: the most a training step laid out like that could reach on this machine now."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_ceiling_worker, [(gemms, kernel, threads, min_seconds)] * processes)
    return sum(f / s for f, s in results)


# ---------------------------------------------------------------- processes

class Bench:
    """The work folder, the ports used (for the /dev/shm clean-up), the runs' common environment."""

    def __init__(self, work: str, threads: int, timeout: int):
        self.work, self.threads, self.timeout = work, threads, timeout
        self.ports: list[int] = []
        self.env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": str(threads),
                    "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.loads: list[float] = []

    def launcher(self, ranks: int, script: str, args: list[str]) -> list[str]:
        """`deepspeed --num_gpus R SCRIPT ARGS` on a fresh port, or one plain process for ranks == 0."""
        if ranks == 0:
            return [sys.executable, script, *args]
        port = free_port()
        self.ports.append(port)
        return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), script, *args]

    def execute(self, cmd: list[str], name: str, watch: str | None = None, memory_of: str | None = None) -> dict:
        """Run `cmd` to its end (its own process group, killed on timeout), output to a log file. Returns
        seconds, output, `first` (seconds until a line matched `watch`), `peak_gb` (rank -> VmHWM of the
        processes whose command line holds `memory_of`)."""
        log = os.path.join(self.work, f"{name}.log")
        self.loads.append(os.getloadavg()[0])
        start = time.perf_counter()
        first, peaks = None, {}
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                while proc.poll() is None:
                    if time.perf_counter() - start > self.timeout:
                        raise RuntimeError(f"{name}: no end after {self.timeout} s: {' '.join(cmd)}")
                    if watch and first is None and re.search(watch, _read(log), re.M):
                        first = time.perf_counter() - start
                    if memory_of:
                        for pid, rank in _ranks_of(proc.pid, memory_of).items():
                            peaks[rank] = max(peaks.get(rank, 0.0), _vm_hwm_gb(pid))
                    time.sleep(0.1 if watch and first is None else 0.25)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        seconds = time.perf_counter() - start
        self.loads.append(os.getloadavg()[0])
        output = _read(log)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(cmd)} exited {proc.returncode}:\n{output[-4000:]}")
        if watch and first is None and re.search(watch, output, re.M):
            first = seconds
        return {"seconds": seconds, "output": output, "first": first, "peak_gb": peaks}

    def clean_up(self, keep: bool) -> list[str]:
        removed = []
        for port in self.ports:
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
                try:
                    os.unlink(path)
                    removed.append(path)
                except OSError:
                    pass
        if not keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return removed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _ranks_of(root: int, needle: str) -> dict[int, int]:
    """pid -> RANK of the descendants of `root` whose command line contains `needle`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            if b"RANK" in env:  # a rank, not the launcher processes whose command lines hold the script too
                found[pid] = int(env[b"RANK"])
        except (OSError, ValueError):
            pass
    return found


def _vm_hwm_gb(pid: int) -> float:
    """Peak resident set size of a process so far (VmHWM), GiB; 0 when it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def result_line(output: str) -> dict:
    return json.loads(re.findall(r"^RESULT (.*)$", output, re.M)[-1])


# ---------------------------------------------------------------- sections

def pretrain_args(data: str, model: str, config: str, out: str, seq: int, steps: int, log_interval: int) -> list[str]:
    return ["--data", data, "--model", model, "--deepspeed_config", config, "--output", out, "--train-steps", str(steps),
            "--seq-length", str(seq), "--log-interval", str(log_interval), "--eval-interval", "0",
            "--save-interval", "0", "--eval-batches", "1"]


def throughput(bench: Bench, args, data: str, model_config: str, configs: dict[str, str], micro: int) -> dict:
    """Per precision: tokens/s of each run per round, medians, ratios, FLOP/s and MFU."""
    from pipeline.config import cpu_has_native_bf16
    from pipeline.models import load_model_config
    from pipeline.monitor import training_flops_per_token

    config, _ = load_model_config(model_config, 0, {})
    flops_per_token = training_flops_per_token(config, args.seq_length)
    gemms = step_gemms(config, micro, args.seq_length)
    native = cpu_has_native_bf16()
    steps = args.warmup + args.steps
    results = {}
    for precision, ds_config in configs.items():
        kernels = run_kernels(precision, native)
        runs = tuple(kernels)
        tokens = {name: [] for name in runs}
        ceilings = {(k, p): [] for k in set(kernels.values()) for p in (1, args.ranks)}
        loads = len(bench.loads)
        for r in range(args.rounds):
            for name in runs if r % 2 == 0 else runs[::-1]:
                label = f"{precision}_{name}_{r}"
                out = os.path.join(bench.work, label)
                if name in ("ours", "ours_compile", "ours_1p"):
                    a = pretrain_args(data, model_config, ds_config, out, args.seq_length, steps, steps)
                    if name == "ours_compile":
                        a.append("--compile")
                    cmd = (bench.launcher(args.ranks, "pipeline/pretrain.py", a) if name in MULTI_RANK
                           else [sys.executable, "-m", "pipeline.pretrain", *a])
                    bench.execute(cmd, label)
                    value = json.load(open(os.path.join(out, "summary.json")))["tokens_per_sec"]
                elif name in ("hf_trainer", "hf_trainer_same_kernels"):
                    peer = [os.path.join(PEERS, "hf_trainer_baseline.py"), "--model-config", model_config,
                            "--deepspeed-config", ds_config, "--seq-length", str(args.seq_length),
                            "--steps", str(args.steps), "--warmup", str(args.warmup)]
                    if name == "hf_trainer_same_kernels":
                        peer.insert(0, os.path.join(REPO, "tools", "peer_with_our_kernels.py"))
                    cmd = bench.launcher(args.ranks, peer[0], peer[1:])
                    value = result_line(bench.execute(cmd, label)["output"])["tokens_per_sec"]
                else:
                    cmd = bench.launcher(0, os.path.join(PEERS, "torch_baseline.py"),
                                         ["--model-config", model_config, "--seq-length", str(args.seq_length),
                                          "--micro-batch", str(micro), "--steps", str(args.steps),
                                          "--warmup", str(args.warmup), "--dtype", precision])
                    value = result_line(bench.execute(cmd, label)["output"])["tokens_per_sec"]
                tokens[name].append(value)
                print(f"[throughput] {precision} round {r + 1} {name:<10} {value:>10,.0f} tokens/s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
            for kernel, processes in ceilings:
                ceilings[(kernel, processes)].append(matmul_ceiling(gemms, kernel, processes, bench.threads))
            print(f"[throughput] {precision} round {r + 1} ceilings " + ", ".join(
                f"{k} x{p}: {v[-1] / 1e9:.1f} GFLOP/s" for (k, p), v in ceilings.items()), flush=True)
        med = {name: statistics.median(v) for name, v in tokens.items()}
        ceiling = {key: statistics.median(v) for key, v in ceilings.items()}
        rows = {}
        for name in runs:
            processes = args.ranks if name in MULTI_RANK else 1
            achieved = med[name] * flops_per_token
            rows[name] = {"tokens_per_sec": tokens[name], "median": med[name], "gflops": achieved / 1e9,
                          "kernel": kernels[name], "processes": processes,
                          "ceiling_gflops": ceiling[(kernels[name], processes)] / 1e9,
                          "mfu": achieved / ceiling[(kernels[name], processes)]}
        results[precision] = {
            "config": ds_config, "runs": rows, "flops_per_token": flops_per_token,
            "ours_vs_hf_trainer": med["ours"] / med["hf_trainer"],
            "ours_compile_vs_hf_trainer": med["ours_compile"] / med["hf_trainer"],
            "ours_compile_vs_ours": med["ours_compile"] / med["ours"],
            "ours_1p_vs_torch_1p": med["ours_1p"] / med["torch_1p"],
            **({"ours_vs_hf_trainer_same_kernels": med["ours"] / med["hf_trainer_same_kernels"],
                "ours_compile_vs_hf_trainer_same_kernels": med["ours_compile"] / med["hf_trainer_same_kernels"]}
               if "hf_trainer_same_kernels" in med else {}),
            "ceilings_gflops": {f"{k} x{p}": v / 1e9 for (k, p), v in ceiling.items()},
            "load": load_range(bench.loads[loads:]),
        }
        print(f"[throughput] {precision}: ours/hf_trainer {results[precision]['ours_vs_hf_trainer']:.2f}x, "
              f"ours_compile/hf_trainer {results[precision]['ours_compile_vs_hf_trainer']:.2f}x, "
              f"ours_1p/torch_1p {results[precision]['ours_1p_vs_torch_1p']:.2f}x", flush=True)
    return results


def steps(bench: Bench, args, model_config: str, configs: dict[str, str]) -> dict:
    """Per precision: tools/step_ab.py at --ranks ranks and in one process (its RESULT line for each)."""
    loads = len(bench.loads)
    rows = {}
    for precision, ds_config in configs.items():
        a = ["--model-config", model_config, "--deepspeed-config", ds_config, "--seq-length", str(args.seq_length),
             "--steps", str(args.ab_steps)]
        rows[precision] = {}
        for kind, ranks in (("ranks", args.ranks), ("one_process", 0)):
            cmd = bench.launcher(ranks, os.path.join(REPO, "tools", "step_ab.py"), a)
            row = result_line(bench.execute(cmd, f"steps_{precision}_{kind}")["output"])
            rows[precision][kind] = row
            print(f"[steps] {precision} {kind:<12} ms per step " + ", ".join(
                f"{name} {ms:.1f}" for name, ms in row["ms_per_step"].items()) + " (load "
                f"{os.getloadavg()[0]:.1f})", flush=True)
    return {"precisions": rows, "steps": args.ab_steps, "load": load_range(bench.loads[loads:])}


def memory(bench: Bench, args, data: str) -> dict:
    """Peak RSS per rank for each ZeRO config (bf16 JSONs as shipped), 2 ranks, a few steps."""
    loads = len(bench.loads)
    params = count_parameters(args.memory_model, vocab_size=2000)
    rows = {}
    for name in args.memory_configs:
        out = os.path.join(bench.work, f"memory_{name}")
        # The shipped JSON, with a micro batch of --memory-micro-batch: activations small beside the model states.
        with open(os.path.join(REPO, "ds_configs", f"{name}.json")) as f:
            ds = json.load(f)
        ds["train_micro_batch_size_per_gpu"] = args.memory_micro_batch
        config = os.path.join(bench.work, f"memory_{name}.json")
        with open(config, "w") as f:
            json.dump(ds, f, indent=2)
        cmd = bench.launcher(args.ranks, "pipeline/pretrain.py",
                             pretrain_args(data, args.memory_model, config, out, args.memory_seq_length, 3, 3))
        done = bench.execute(cmd, f"memory_{name}", memory_of="pipeline/pretrain.py")
        rows[name] = {"peak_gb_per_rank": [round(done["peak_gb"][r], 3) for r in sorted(done["peak_gb"])],
                      "seconds": done["seconds"]}
        print(f"[memory] {name:<14} peak per rank {rows[name]['peak_gb_per_rank']} GB (load {os.getloadavg()[0]:.1f})",
              flush=True)
    base = max(rows["zero0"]["peak_gb_per_rank"]) if "zero0" in rows else None
    for row in rows.values():
        row["vs_zero0"] = max(row["peak_gb_per_rank"]) / base if base else None
    return {"model": args.memory_model, "parameters": params, "seq_length": args.memory_seq_length,
            "micro_batch": args.memory_micro_batch,
            "ranks": args.ranks, "configs": rows, "load": load_range(bench.loads[loads:])}


def launch(bench: Bench, args, data: str, model_config: str, config: str) -> dict:
    """Seconds from starting the command to the first step's log line (the end of optimizer step 1)."""
    loads = len(bench.loads)
    times: dict[str, list[float]] = {"ranks": [], "one_process": []}
    for r in range(args.launch_rounds):
        for kind in ("ranks", "one_process") if r % 2 == 0 else ("one_process", "ranks"):
            out = os.path.join(bench.work, f"launch_{kind}_{r}")
            a = pretrain_args(data, model_config, config, out, args.seq_length, 2, 1)
            cmd = (bench.launcher(args.ranks, "pipeline/pretrain.py", a) if kind == "ranks"
                   else [sys.executable, "-m", "pipeline.pretrain", *a])
            done = bench.execute(cmd, f"launch_{kind}_{r}", watch=r"^step +1/")
            times[kind].append(done["first"])
            print(f"[launch] {kind:<12} first step after {done['first']:.1f} s (run {done['seconds']:.1f} s)",
                  flush=True)
    return {"seconds": times, "median": {k: statistics.median(v) for k, v in times.items()},
            "load": load_range(bench.loads[loads:])}


def prepare(bench: Bench, args) -> dict:
    loads = len(bench.loads)
    cmd = [sys.executable, os.path.join(REPO, "tools", "bench_prepare.py"), "--rounds", str(args.prepare_rounds),
           "--mb", str(args.prepare_mb), "--workdir", os.path.join(bench.work, "prepare")]
    output = bench.execute(cmd, "prepare")["output"]
    start = re.search(r"^\{", output, re.M)
    if start is None:
        raise RuntimeError(f"tools/bench_prepare.py printed no JSON report:\n{output[-3000:]}")
    report, _ = json.JSONDecoder().raw_decode(output[start.start():])
    print(f"[prepare] ours {report['ours']['tokens_per_sec']:,} tok/s, baseline {report['baseline']['tokens_per_sec']:,} "
          f"tok/s: {report['speedup']}x", flush=True)
    return {**report, "load": load_range(bench.loads[loads:])}


def load_range(values: list[float]) -> list[float]:
    return [round(min(values), 2), round(max(values), 2)] if values else []


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: bf16 only, 1 round of 4 timed steps, memory of llama-20m for zero0 and zero3, "
                        "1 launch round, a 2 MB prepare corpus; flags given explicitly still win")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    p.add_argument("--model", default="tiny", help="preset or model config JSON for throughput and launch (default: tiny)")
    p.add_argument("--config", default="ds_configs/zero2.json",
                   help="DeepSpeed JSON for ours and the HF Trainer (default: ds_configs/zero2.json, ZeRO-2 bf16)")
    p.add_argument("--precisions", default=None,
                   help="comma-separated, of bf16 and fp32: the JSON as given (bf16) and with bf16/fp16 disabled "
                        "(fp32) (default: bf16,fp32; --quick: bf16)")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per sample (default: 256)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per throughput run (default: 40, "
                   "a few seconds: a shared machine's slow spells last seconds, so shorter runs sample them; --quick: 4)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps before them (default: 2, which pipeline.pretrain always leaves out)")
    p.add_argument("--ranks", type=int, default=2, help="data-parallel ranks for the multi-rank runs (default: 2)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"threads of every process, one-process runs too (default: cores / ranks, {cores} cores here)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved throughput rounds (default: 3; --quick: 1)")
    p.add_argument("--ab-steps", type=int, default=None,
                   help="timed steps of each arm in the steps section (default: 40; --quick: 6)")
    p.add_argument("--memory-model", default=None,
                   help="preset for the memory section (default: llama-350m, ~285M parameters at the 2000-token "
                        "vocabulary; --quick: llama-20m)")
    p.add_argument("--memory-configs", default=None,
                   help=f"comma-separated ds_configs/ names (default: {','.join(MEMORY_CONFIGS)}; --quick: zero0,zero3)")
    p.add_argument("--memory-seq-length", type=int, default=64,
                   help="sequence length in the memory runs: short, so that activations stay small (default: 64)")
    p.add_argument("--memory-micro-batch", type=int, default=1,
                   help="micro batch per rank in the memory runs, in place of the JSON's (default: 1)")
    p.add_argument("--launch-rounds", type=int, default=None, help="launch-time rounds (default: 2; --quick: 1)")
    p.add_argument("--prepare-mb", type=float, default=None, help="corpus size for the prepare section (default: 20; "
                   "--quick: 2)")
    p.add_argument("--prepare-rounds", type=int, default=None, help="prepare rounds (default: 2; --quick: 1)")
    p.add_argument("--data", help="a prepared data folder (default: the demo corpus, prepared here, vocabulary 2000)")
    p.add_argument("--report", default=None,
                   help="Markdown report to write (default: docs/BENCHMARKS.md; --quick: none unless given)")
    p.add_argument("--json", default=None, help="also write every figure as JSON here")
    p.add_argument("--rewrite-report", metavar="JSON", default=None,
                   help="run nothing: write --report (default docs/BENCHMARKS.md) from the --json file of an earlier run")
    p.add_argument("--gpu-json", metavar="JSON", default=None,
                   help="the gpu_check.json of `bash tools/gpu_check.sh` (run on a GPU machine) to put in the report's "
                        "GPU section; with --rewrite-report, a report from an earlier run plus the GPU figures")
    p.add_argument("--timeout", type=int, default=1800, help="seconds after which one run is killed (default: 1800)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, run folders) and print its path")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"precisions": ("bf16", "bf16,fp32"), "steps": (4, 40), "rounds": (1, 3), "ab_steps": (6, 40),
                "memory_model": ("llama-20m", "llama-350m"), "memory_configs": ("zero0,zero3", ",".join(MEMORY_CONFIGS)),
                "launch_rounds": (1, 2), "prepare_mb": (2, 20), "prepare_rounds": (1, 2),
                "report": (None, os.path.join(REPO, "docs", "BENCHMARKS.md"))}
    for key, (fast, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, fast if quick else full)
    args.threads = args.threads or max(1, cores // args.ranks)
    args.sections = [s for s in args.sections.split(",") if s]
    args.precisions = [s for s in args.precisions.split(",") if s]
    args.memory_configs = [s for s in args.memory_configs.split(",") if s]
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"--sections: unknown {s!r} (choose from {', '.join(SECTIONS)})")
    for s in args.precisions:
        if s not in ("bf16", "fp32"):
            p.error(f"--precisions: unknown {s!r} (bf16 or fp32)")
    return args


def precision_configs(config: str, precisions: list[str], work: str) -> dict[str, str]:
    """precision -> DeepSpeed JSON path: bf16 is the JSON as given, fp32 a copy with bf16/fp16 disabled."""
    from pipeline.config import load_ds_config

    paths = {}
    for precision in precisions:
        if precision == "bf16":
            paths[precision] = os.path.abspath(config)
        else:
            cfg = load_ds_config(config)
            for key in ("bf16", "fp16", "bfloat16"):
                cfg.pop(key, None)
            cfg["bf16"] = {"enabled": False}
            paths[precision] = os.path.join(work, "config_fp32.json")
            with open(paths[precision], "w") as f:
                json.dump(cfg, f, indent=2)
    return paths


def machine() -> dict:
    import deepspeed
    import torch
    import transformers

    from pipeline.config import cpu_has_native_bf16

    flags = ""
    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        info = _read("/proc/cpuinfo")
        cpu = (re.findall(r"^model name\s*:\s*(.*)$", info, re.M) or [cpu])[0]
        flags = (re.findall(r"^flags\s*:\s*(.*)$", info, re.M) or [""])[0]
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()]
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "simd": simd, "native_bf16": cpu_has_native_bf16(),
            "memory_gb": round(memory_gb, 1), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.rewrite_report:
        with open(args.rewrite_report) as f:
            results = json.load(f)
        if args.gpu_json:
            with open(args.gpu_json) as f:
                results["gpu"] = json.load(f)
        write_report(args.report or os.path.join(REPO, "docs", "BENCHMARKS.md"), results)
        return results
    from pipeline.config import load_ds_config
    from pipeline.models import load_model_config

    work = tempfile.mkdtemp(prefix="benchmark-")
    bench = Bench(work, args.threads, args.timeout)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results: dict = {"machine": machine(), "started": started, "command": "python tools/benchmark.py " +
                     " ".join(sys.argv[1:] if argv is None else argv), "threads": args.threads, "ranks": args.ranks,
                     "load_at_start": list(os.getloadavg())}
    try:
        data = args.data
        if data is None and set(args.sections) & {"throughput", "steps", "memory", "launch"}:
            data = os.path.join(work, "data")
            corpus = os.path.join(work, "corpus.jsonl")
            bench.execute([sys.executable, "tools/make_demo_corpus.py", corpus], "corpus")
            bench.execute([sys.executable, "-m", "pipeline.prepare", "--input", corpus, "--output", data,
                           "--vocab-size", "2000", "--quiet"], "prepare_data")
        if data is not None:
            from pipeline.data.tokenizer import Tokenizer

            config, _ = load_model_config(args.model, Tokenizer.load(data).vocab_size, {})
            config.save_pretrained(work)  # config.json: read by the peers (AutoConfig) and by us (--model FILE)
            model_config = os.path.join(work, "model_config.json")
            os.replace(os.path.join(work, "config.json"), model_config)
        micro = load_ds_config(args.config)["train_micro_batch_size_per_gpu"]
        results.update(model=args.model, config=args.config, seq_length=args.seq_length, micro_batch=micro)
        if "throughput" in args.sections:
            configs = precision_configs(args.config, args.precisions, work)
            results["throughput"] = throughput(bench, args, data, model_config, configs, micro)
        if "steps" in args.sections:
            results["steps"] = steps(bench, args, model_config, precision_configs(args.config, args.precisions, work))
        if "memory" in args.sections:
            results["memory"] = memory(bench, args, data)
        if "launch" in args.sections:
            results["launch"] = launch(bench, args, data, model_config, args.config)
        if "prepare" in args.sections:
            results["prepare"] = prepare(bench, args)
        if args.gpu_json:
            with open(args.gpu_json) as f:
                results["gpu"] = json.load(f)
    finally:
        removed = bench.clean_up(args.keep)
        if args.keep:
            print(f"work folder kept: {work}")
    results["load_at_end"] = list(os.getloadavg())
    results["shm_files_removed"] = len(removed)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1, default=str)[:6000])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.report:
        write_report(args.report, results)
        print(f"wrote {args.report}")
    return results


# ---------------------------------------------------------------- the report

CAVEATS = """\
- The machine is shared: other jobs ran during the measurement (the load average is given per section). Runs are
  interleaved per round and medians are reported so that a slow spell hits every run alike; single figures move
  by 10-30% between rounds, and a 2-thread process is hit hardest (an OpenMP parallel region waits for its
  slowest thread: with one core busy elsewhere, a 131k-element multiply measured 0.03 ms on 1 thread and
  0.4-8 ms on 2).
- bf16 kernels. On a CPU with native bf16 (AMX or AVX512-BF16) every run uses torch's bf16 GEMM; `pipeline.pretrain`
  differs in one kernel choice (pipeline/models/cpu_bf16.py): attention whose sequence x head size is at most
  16384 runs on fp32 kernels, because torch's bf16 flash-attention backward has a fixed cost per (batch, head)
  that dominates short rows (causal forward + backward at `tiny`'s (4, 4, 256, 32): 17.5 ms in bf16, 10.8 ms
  on fp32 kernels; one thread, 2026-12-06); the peers use torch's bf16 flash attention. On a CPU without native
  bf16, torch's bf16 GEMM and SDPA are slow generic code, and `pipeline.pretrain` runs all its bf16 matrix
  products on fp32 kernels (bf16 operands, exact fp32 products and accumulation, bf16 result, the numbers a
  native bf16 GEMM gives): there the report adds `hf_trainer_same_kernels`, the HF Trainer given the same
  kernels (tools/peer_with_our_kernels.py), so that the framework ratio is read apart from the kernel choice.
  (On the 2-core AVX2 machine of 2026-11-29, before that run existed: ours / HF Trainer 6.07x in bf16, 1.03x
  in fp32.)
- Where the time of a bf16 step goes on the AMX CPU (`tiny`, one process, one thread, torch.profiler): before
  the attention rule, SDPA ~33% (its bf16 backward ~28%), matrix products ~17%, copies and other element-wise
  work ~30%, the cross-entropy's log-softmax ~7%; after it, matrix products ~22%, SDPA ~21%, copies ~9%,
  multiplies ~8%, log-softmax ~7%. The loss is then taken from the logits in chunks of rows
  (pipeline/models/cross_entropy.py) instead of the HF model's fp32 copy of all of them: 1.07x per bf16 step
  at this 2,000-token vocabulary, 1.59x at 32,000 (one process, alternating steps). With AMX the matrix
  products are cheap, so `tiny` is bound by the rest (hence the low bf16 MFU), which is what `--compile` fuses. In fp32 (on the AVX2 machine, 2026-11-29) the
  matrix products were ~50% of a step and the compile gained nothing measurable.
- `ours_compile` is `pipeline.pretrain --compile` (torch.compile with inductor through DeepSpeed's
  `engine.compile`). Its compile happens in the first step, which the figure leaves out: about a minute the
  first time, seconds in later rounds (inductor caches the generated code).
- Run to run on this machine (a VM whose neighbours' load comes and goes): back-to-back runs of one command moved
  by up to 30% (10,272 and 15,115 tokens/s), and the machine's speed changes in spells of seconds (one run's
  per-step log alternated between ~6,400 and ~8,800 tokens/s in blocks of 5-10 steps). With 5 rounds a whole-run
  ratio within ~0.1 of another is not a measured difference. Earlier whole runs, 3 rounds each, gave bf16 ours /
  HF Trainer 1.15x (2026-12-06 01:48, before the chunked loss), 1.04x (02:41) and 1.25x (03:11, 5 rounds), one
  process 0.94x, 0.91x and 0.82x. So the report also times the step alone (the steps section,
  `tools/step_ab.py`): every rank holds the arms side by side and alternates them step by step, so a slow spell
  hits them alike; its ratios still move by several percent between runs (bf16, 2 ranks, on 2026-12-06: 1.09x and
  1.15x over the HF Trainer's step before the attention implementation below, 1.20x after it at 04:24 UTC, and
  1.26x, 1.29x and 1.30x in three runs after the shared-memory collectives below, 06:20-06:30 UTC). Whole runs
  after that change: this report's 1.32x (06:26 UTC) and a second bf16-only run, `python tools/benchmark.py
  --sections throughput --precisions bf16 --rounds 5` at 07:23 UTC: ours / HF Trainer 1.32x again, `--compile`
  1.55x, one process / torch loop 1.08x.
- Communication between the 2 ranks: `pipeline.pretrain` sends DeepSpeed's all-reduce, all-gather and
  reduce-scatter between the ranks of one CPU node through shared memory (pipeline/distributed.py,
  `SharedMemoryCollectives`, since 2026-12-06 06:20 UTC); the HF Trainer's DeepSpeed sends them through gloo's TCP
  sockets, as it does for its users, and in the steps section the HF arm's steps run with the routing off. Per
  call here: a 2 MB bf16 all-reduce 1.0 ms against gloo's 3.2, an all-gather to 2 MB 1.1 against 2.0, a
  one-element all-reduce 0.03 against 0.22; per `tiny` step (alternating steps in one run, the same losses bit
  for bit) 1.03-1.05x under ZeRO-0/2 and 1.13-1.17x under ZeRO-3.
- What the step gained on 2026-12-06 (04:00-04:25 UTC), each measured by alternating steps in one process: the
  loss in ~512 KB chunks instead of 4 MB (the loss's forward + backward 1.2-1.3x at this vocabulary), torch's
  fused AdamW (`"fused": true`, 3-5x on the optimizer step), and the attention rule as an attention
  implementation instead of a TorchFunctionMode over the whole forward (~2% per step). Tried and left: a
  custom RMSNorm autograd function (~1% per step), an all-bf16 attention by matrix products (slower than the
  fp32 flash kernel at these shapes), skipping DeepSpeed's bf16 overflow check (`bf16.check_grad_overflow`,
  ~2% per step, but it is DeepSpeed's guard that skips a step with non-finite gradients: not ours to drop).
- One process against the plain torch loop: in the steps section, ours' bf16 step is faster than the loop's
  (autocast's weight casts every step, torch's bf16 flash attention, the loss on an fp32 copy of the logits);
  in fp32 DeepSpeed's engine (ZeRO-2 on a world of one: gradient hooks, flat fp32 partitions, the overflow
  check, its own clipping) costs 4-7% per step (0.96x at 04:24 UTC, 0.93x at 06:50 UTC on 2026-12-06). The whole-run figures of the throughput section come from
  separate processes, whose spread on this machine is larger than that.
- MFU is against a ceiling measured in the same round: the GEMMs of one step alone, by the same number of
  processes and threads, in the kernels the run uses (on a CPU without native bf16, `bf16-via-fp32` for ours in
  bf16 and `bf16` for the peers). The attention term counts the full T x T score and value products (the usual
  convention); causal kernels skip about half of them. The ceilings move with the machine's load like the runs
  do (a 2-process ceiling above twice the 1-process one is such a spell).
- The peers train on random token ids, ours on the prepared demo corpus; shapes, model and JSON are the same.
  The HF Trainer's figure is its slowest rank over the timed steps; ours is all ranks' tokens over the same
  span, after the first 2 steps.
- Memory is the peak resident set (VmHWM) of each rank process: imports and the allocator's cached memory
  are included, and the model is built in fp32 on every rank before DeepSpeed partitions it. On a CPU,
  "offload" moves nothing off the device: it only changes where the optimizer step runs.
- ZeRO-3 on a CPU, traced per phase on rank 0 (llama-350m, 2 ranks): after a step the live tensors are what the
  ZeRO arithmetic says (~2.3 GB: the bf16 parameter shard, fp32 master, Adam moments and gradient shard), yet
  with DeepSpeed's default buckets and glibc's default allocator the resident peak was 6.6 GB, above ZeRO-0.
  Two causes, both fixed: DeepSpeed's defaults (a 5e8-element reduce bucket, and one 1e9-element optimizer
  sub-group whose gradient buffer DeepSpeed sizes by the unpartitioned parameter count, the whole model in
  fp32) cost ~1.3 GB: the shipped zero3 JSONs set reduce/prefetch buckets of 5e7, 1e8 live parameters and
  2e7-element sub-groups. And ZeRO-3 gathers and frees every layer's parameters each step, whose freed blocks
  glibc kept resident (~1.3 GB): under ZeRO-3 on a CPU the stages fix glibc's mmap threshold at 128 KB
  (`pipeline.distributed.return_freed_memory_under_zero3`), so freed blocks go back to the system.
  Building the model directly partitioned (`deepspeed.zero.Init`) would also avoid the fp32 model every rank
  builds first (4 bytes a parameter), but that happens before the optimizer states exist and stays below the
  step's peak; the models are built as in the other stages, so a seed gives the same initial weights in all.
"""


def measured_separately(section: dict) -> list[str]:
    """The report's line for a section measured by other commands than the report's own (merged in later)."""
    if not section.get("commands"):
        return []
    return ["This section was measured separately, by " + " and ".join(f"`{c}`" for c in section["commands"]) +
            f" ({section['started']}).", ""]


def write_report(path: str, r: dict) -> None:
    m = r["machine"]
    lines = ["# Benchmarks", "",
             "Written by `tools/benchmark.py` (its `--help` explains every flag and the method). Only measured "
             "numbers; rerun the command to refresh them.", "",
             f"Command: `{r['command']}`, started {r['started']}.", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['simd']) or 'no AVX2'}; native bf16: "
             f"{'yes' if m['native_bf16'] else 'no'}), {m['memory_gb']} GB RAM; torch {m['torch']}, deepspeed "
             f"{m['deepspeed']}, transformers {m['transformers']}, Python {m['python']}. Shared with other jobs: "
             f"load average {r['load_at_start'][0]:.1f} at the start, {r['load_at_end'][0]:.1f} at the end.", "",
             f"Every process runs {r['threads']} thread(s) (OMP_NUM_THREADS); multi-rank runs use {r['ranks']} ranks.",
             ""]
    if "throughput" in r:
        lines += ["## Training throughput", "",
                  f"Model `{r['model']}`, `{r['config']}`, sequence {r['seq_length']}, micro batch {r['micro_batch']} "
                  f"per rank. Tokens/s of every round, median; GFLOP/s = median x FLOPs per token; MFU against the "
                  f"matmul ceiling of the run's layout and kernels.", ""]
        for precision, t in r["throughput"].items():
            lines += [f"### {precision} (load average {t['load'][0]}-{t['load'][1]} during these runs)", "",
                      f"FLOPs per token: {t['flops_per_token'] / 1e6:.2f} M. Ceilings measured (GFLOP/s): " +
                      ", ".join(f"{k}: {v:.1f}" for k, v in t["ceilings_gflops"].items()) + ".", "",
                      "| run | processes | kernels | tokens/s per round | median | GFLOP/s | MFU |",
                      "|---|---|---|---|---|---|---|"]
            for name, row in t["runs"].items():
                lines.append(f"| {name} | {row['processes']} | {row['kernel']} | "
                             f"{', '.join(f'{v:,.0f}' for v in row['tokens_per_sec'])} | {row['median']:,.0f} | "
                             f"{row['gflops']:.1f} | {row['mfu']:.1%} |")
            target = "target >= 1.25x" if precision == "bf16" else "no target"
            lines += ["", f"- ours / HF Trainer ({r['ranks']} ranks, ZeRO from the JSON): "
                          f"**{t['ours_vs_hf_trainer']:.2f}x** ({target})"]
            if "ours_compile_vs_hf_trainer" in t:  # reports of runs before ours_compile existed lack it
                lines += [f"- ours with `--compile` / HF Trainer: **{t['ours_compile_vs_hf_trainer']:.2f}x**; "
                          f"with / without `--compile`: {t['ours_compile_vs_ours']:.2f}x"]
            if "ours_vs_hf_trainer_same_kernels" in t:
                lines += [f"- at equal matmul kernels (the HF Trainer given ours, `tools/peer_with_our_kernels.py`): "
                          f"ours **{t['ours_vs_hf_trainer_same_kernels']:.2f}x**, with `--compile` "
                          f"**{t['ours_compile_vs_hf_trainer_same_kernels']:.2f}x**"]
            lines += [f"- ours in one process / the plain torch loop: **{t['ours_1p_vs_torch_1p']:.2f}x** "
                      f"(target >= 0.90x)", ""] + measured_separately(t)
        lines += ["Kernels: " + "; ".join(f"`{k}`: {v}" for k, v in KERNELS.items()) + ".", ""]
    if "steps" in r:
        st = r["steps"]
        lines += ["## The step alone, side by side in one process", "",
                  f"`tools/step_ab.py`: every rank holds ours, the HF Trainer's step (its model, its loss, its "
                  f"DeepSpeed JSON) and, in one process, the plain torch loop's, on copies of one model, and takes "
                  f"one step of each in turn, {st['steps']} timed steps each; medians of the per-step times "
                  f"(`{r['model']}`, `{r['config']}`, sequence {r['seq_length']}, micro batch {r['micro_batch']}); "
                  f"load average {st['load'][0]}-{st['load'][1]}. The Trainer's own per-step work (data loader, "
                  f"callbacks) is not in its figure.", "",
                  "| precision | processes | ms per step: ours | HF Trainer's step | torch loop | ours / HF step "
                  "| ours / torch loop |", "|---|---|---|---|---|---|---|"]
        for precision, kinds in st["precisions"].items():
            for row in kinds.values():
                ms = row["ms_per_step"]
                torch_ms = f"{ms['torch']:.1f}" if "torch" in ms else "-"
                vs_torch = f"**{row['ours_vs_torch']:.2f}x**" if "ours_vs_torch" in row else "-"
                lines.append(f"| {precision} | {row['world_size']} | {ms['ours']:.1f} | {ms['hf']:.1f} | {torch_ms} | "
                             f"**{row['ours_vs_hf']:.2f}x** | {vs_torch} |")
        lines += ["", "A ratio is the other step's time over ours (above 1: ours is faster).", ""]
        lines += measured_separately(st)
    if "memory" in r:
        mem = r["memory"]
        lines += ["## Peak memory per rank", "",
                  f"`{mem['model']}` ({mem['parameters'] / 1e6:.1f} M parameters), sequence {mem['seq_length']}, "
                  f"{mem['ranks']} ranks, 3 steps, the bf16 JSONs of `ds_configs/` as shipped but for a micro batch of "
                  f"{mem.get('micro_batch', 4)}; load average "
                  f"{mem['load'][0]}-{mem['load'][1]}.", "",
                  "| config | peak GB per rank | max / ZeRO-0 |", "|---|---|---|"]
        for name, row in mem["configs"].items():
            ratio = f"{row['vs_zero0']:.2f}" if row["vs_zero0"] is not None else "n/a"
            lines.append(f"| {name} | {', '.join(f'{v:.2f}' for v in row['peak_gb_per_rank'])} | {ratio} |")
        lines += ["", "Target: ZeRO-3 <= 0.60 x ZeRO-0.", ""] + measured_separately(mem)
    if "launch" in r:
        la = r["launch"]
        lines += ["## Launch to first step", "",
                  f"Seconds from starting the command to the log line of optimizer step 1 (`{r['model']}`, "
                  f"`{r['config']}`); load average {la['load'][0]}-{la['load'][1]}.", "",
                  "| layout | per round | median |", "|---|---|---|"]
        for kind, values in la["seconds"].items():
            label = f"{r['ranks']} ranks (deepspeed launcher)" if kind == "ranks" else "one process"
            lines.append(f"| {label} | {', '.join(f'{v:.1f}' for v in values)} | {la['median'][kind]:.1f} |")
        lines += [""] + measured_separately(la)
    if "prepare" in r:
        pr = r["prepare"]
        lines += ["## Data preparation", "",
                  f"`tools/bench_prepare.py` (whole processes, interleaved): {pr['corpus_bytes'] / 1e6:.1f} MB, "
                  f"{pr['documents']:,} documents; load average {pr['load'][0]}-{pr['load'][1]}.", "",
                  "| program | seconds per round | tokens/s |", "|---|---|---|",
                  f"| pipeline.prepare ({pr['ours']['workers']} workers) | "
                  f"{', '.join(f'{v:.2f}' for v in pr['ours']['seconds'])} | {pr['ours']['tokens_per_sec']:,} |",
                  f"| prepare_baseline.py (datasets.map, {pr['baseline']['num_proc']} processes) | "
                  f"{', '.join(f'{v:.2f}' for v in pr['baseline']['seconds'])} | {pr['baseline']['tokens_per_sec']:,} |",
                  "", f"Speed-up **{pr['speedup']}x** (target >= 2x); same ids: {pr.get('same_ids')}.", ""]
        lines += measured_separately(pr)
    lines += ["## On a GPU", ""]
    if "gpu" in r:
        g = r["gpu"]
        peak = (f"; MFU against the GPU's dense half-precision peak ({g['peak_flops'] / 1e12:.0f} TFLOP/s)"
                if g["peak_flops"] else "")
        lines += [f"`bash tools/gpu_check.sh` on {g['device']}, torch {g['torch']}: `python -m pipeline.pretrain`, one GPU, "
                  f"ZeRO-0, sequence {g['seq_length']}, micro batch {g['micro_batch']}, {g['steps']} steps (tokens/s "
                  f"leave out the first 2){peak}.", "",
                  "| run | parameters | precision | tokens/s | TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
        for row in g["runs"]:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            lines.append(f"| {row['run']} | {row['parameters'] / 1e6:.0f} M | {row['precision']} | "
                         f"{row['tokens_per_sec']:,.0f} | {row['tflops']:.0f} | {mfu} |")
        lines += ["", "Target: MFU >= 45% in bf16.", ""]
    else:
        lines += ["Not measured yet: no GPU was available to the runs of this report. `bash tools/gpu_check.sh` "
                  "measures tokens/s and MFU of `llama-350m` and `llama-1b` in bf16, fp16 and bf16 with `--compile` "
                  "on one GPU in a few minutes (target: MFU >= 45% in bf16); `python tools/benchmark.py "
                  "--rewrite-report RESULTS.json --gpu-json gpu_check.json` adds its figures here.", ""]
    lines += ["## Caveats", "", CAVEATS]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
