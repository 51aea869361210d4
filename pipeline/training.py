"""The one training loop every stage shares: optimizer steps, logging, evaluation, checkpoints, resume.

A stage supplies a `Task` (its data, its loss, its evaluation); the loop owns everything else. The
loss is read on the host only at log intervals, so steps queue on the accelerator without a sync.

Checkpoints: `RUN/checkpoints/global_stepN/` in DeepSpeed's layout, plus one `rng_rankR.pt` per
rank. `latest` is written by this loop (not DeepSpeed) after every rank has finished its files,
under a temporary name and then renamed: a kill mid-save never leaves `latest` naming a partial
checkpoint. The last `keep` checkpoints are kept.
"""
from __future__ import annotations

import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.distributed import barrier
from pipeline.monitor import Monitor, memory_gb


class Task(Protocol):
    tokens_per_step: int  # tokens of one optimizer step across all ranks (for throughput)

    def next_batch(self) -> dict[str, torch.Tensor]: ...  # this rank's next micro-batch
    def loss(self, engine, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def evaluate(self, engine, split: str) -> dict[str, float]: ...  # averaged over ranks
    def state(self) -> dict: ...  # data position, restored by load_state on resume
    def load_state(self, state: dict) -> None: ...


@dataclass
class LoopSettings:
    train_steps: int
    log_interval: int
    eval_interval: int
    save_interval: int
    keep_checkpoints: int
    checkpoint_dir: str
    warmup_steps: int = 2  # steps left out of the throughput figure (first-step allocation, warm caches)


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------- checkpoints

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_tags(checkpoint_dir: str) -> list[str]:
    """Checkpoint folders, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    tags = [t for t in os.listdir(checkpoint_dir) if re.fullmatch(r"global_step\d+", t)]
    return sorted(tags, key=lambda t: int(t[len("global_step"):]))


def latest_tag(checkpoint_dir: str) -> str | None:
    path = os.path.join(checkpoint_dir, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path, encoding="utf-8").read().strip()
    if not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        raise FileNotFoundError(f"{path} names {tag!r}, which is missing; delete {path} to start over "
                                f"or point it at one of {checkpoint_tags(checkpoint_dir)}")
    return tag


def save_checkpoint(engine, settings: LoopSettings, step: int, client_state: dict) -> None:
    tag = f"global_step{step}"
    engine.save_checkpoint(settings.checkpoint_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), os.path.join(settings.checkpoint_dir, tag, f"rng_rank{engine.global_rank}.pt"))
    barrier()  # every rank's files are on disk before `latest` may name them
    if engine.global_rank == 0:
        tmp = os.path.join(settings.checkpoint_dir, "latest.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(settings.checkpoint_dir, "latest"))
        for old in checkpoint_tags(settings.checkpoint_dir)[:-settings.keep_checkpoints]:
            shutil.rmtree(os.path.join(settings.checkpoint_dir, old), ignore_errors=True)
    barrier()


def resume(engine, task: Task, settings: LoopSettings) -> int:
    """Load `latest` when there is one; returns the step to continue from (0 for a fresh run)."""
    tag = latest_tag(settings.checkpoint_dir)
    if tag is None:
        return 0
    path, client_state = engine.load_checkpoint(settings.checkpoint_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {settings.checkpoint_dir}/{tag}")
    task.load_state(client_state["data"])
    rng_file = os.path.join(settings.checkpoint_dir, tag, f"rng_rank{engine.global_rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming at another world size: data order is still exact
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return int(client_state["step"])


# ---------------------------------------------------------------- the loop

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(engine, task: Task, settings: LoopSettings, monitor: Monitor, start_step: int) -> dict:
    """Run optimizer steps start_step+1 .. train_steps. Returns the final train metrics."""
    device = engine.device
    accum = engine.gradient_accumulation_steps()
    step = start_step
    recent = torch.zeros((), device=device)  # loss of the last optimizer step, summed over micro-batches
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    last = {"train_loss": None, "grad_norm": None}
    timed_steps, excluded = 0, 0.0
    clock = time.perf_counter()
    interval_start, interval_steps, interval_excluded = clock, 0, 0.0

    while step < settings.train_steps:
        recent.zero_()
        for _ in range(accum):
            batch = task.next_batch()
            loss = task.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            recent += loss.detach().float()
        step += 1
        interval_steps += 1
        # Remember the first non-finite step without a host sync; checked at log time.
        bad = ~torch.isfinite(recent)
        first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)

        if step == start_step + settings.warmup_steps:  # throughput is timed from here
            _sync(device)
            clock, excluded, timed_steps = time.perf_counter(), 0.0, 0
        elif step > start_step + settings.warmup_steps:
            timed_steps += 1

        is_log = step % settings.log_interval == 0 or step == settings.train_steps
        is_eval = settings.eval_interval > 0 and step % settings.eval_interval == 0
        is_save = settings.save_interval > 0 and step % settings.save_interval == 0
        if is_log or is_eval or is_save:
            if int(first_bad) >= 0:
                raise NonFiniteLoss(f"the training loss was not finite ({float(recent / accum)}) at step {int(first_bad)}: "
                                    "lower the learning rate, raise warmup, check the data, or use bf16 instead of fp16")
        if is_log:
            _sync(device)
            now = time.perf_counter()
            values = torch.stack([recent / accum]).double()
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(values)
                values /= torch.distributed.get_world_size()
            last["train_loss"] = float(values[0])
            norm = engine.get_global_grad_norm()
            last["grad_norm"] = float(norm) if norm is not None else None
            seconds = now - interval_start - interval_excluded
            tokens_per_sec = interval_steps * task.tokens_per_step / max(seconds, 1e-9)
            lr = engine.get_lr()[0]
            perf = monitor.throughput(tokens_per_sec)
            scalars = {"Train/loss": last["train_loss"], "Train/lr": lr, "Train/grad_norm": last["grad_norm"],
                       "Train/tokens_per_sec": tokens_per_sec, "Train/tflops": perf["tflops"],
                       "Train/mfu": perf["mfu"], "Train/memory_gb": memory_gb(device)}
            # FP16_Optimizer calls it cur_scale, the ZeRO optimizers loss_scale.
            scale = (getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
                     if engine.fp16_enabled() else None)
            if scale is not None:
                scalars["Train/loss_scale"] = float(scale)
            monitor.scalars(step, scalars)
            norm_text = f"{last['grad_norm']:.3f}" if last["grad_norm"] is not None else "n/a"
            monitor.print(f"step {step:>6}/{settings.train_steps} | loss {last['train_loss']:.4f} | lr {lr:.2e} | "
                          f"grad {norm_text} | {tokens_per_sec:,.0f} tok/s | {perf['tflops']:.3f} TFLOP/s | "
                          f"mem {scalars['Train/memory_gb']:.2f} GB")
            interval_start, interval_steps, interval_excluded = time.perf_counter(), 0, 0.0

        if is_eval or is_save:
            t0 = time.perf_counter()
            if is_eval:
                metrics = task.evaluate(engine, "valid")
                monitor.scalars(step, {f"Eval/{k}": v for k, v in metrics.items()})
                monitor.print(f"step {step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if is_save:
                save_checkpoint(engine, settings, step, {"step": step, "data": task.state()})
            spent = time.perf_counter() - t0
            excluded += spent
            interval_excluded += spent

    _sync(device)
    timed_seconds = time.perf_counter() - clock - excluded
    tokens_per_sec = (timed_steps * task.tokens_per_step / timed_seconds) if timed_steps and timed_seconds > 0 else None
    if settings.save_interval > 0 and step % settings.save_interval != 0 and step > start_step:
        save_checkpoint(engine, settings, step, {"step": step, "data": task.state()})  # the final state
    return {"steps": step, "train_loss": last["train_loss"], "grad_norm": last["grad_norm"],
            "tokens_per_sec": tokens_per_sec, "perplexity": math.exp(min(last["train_loss"] or 0.0, 50.0))}
