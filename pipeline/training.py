"""The one training loop every stage shares: optimizer steps, logging, evaluation, checkpoints, resume.

A stage supplies a `Task` (its data, its loss, its evaluation); the loop owns everything else. The
loss is read on the host only at log intervals, so steps queue on the accelerator without a sync.
With a pipeline engine (a `pipeline` block with stages > 1) each optimizer step is one
`engine.train_batch` over the task's `micro_batches()` iterator; everything else is the same.

Checkpoints: `RUN/checkpoints/global_stepN/` in DeepSpeed's layout, plus one `rng_rankR.pt` per
rank. `latest` is written by this loop (not DeepSpeed) after every rank has finished its files,
under a temporary name and then renamed: a kill mid-save never leaves `latest` naming a partial
checkpoint. A checkpoint folder newer than the one `latest` names (or any, with no `latest`) was being
written when the run died: resume says so and removes it. The last `keep` checkpoints are kept.
Each checkpoint's client state holds the step, the data position (`task.state()`), the best record and
the train metrics at that step (train_loss, grad_norm, tokens_per_sec): a rerun with nothing left to
train reports those, not nulls. Throughput leaves the first `warmup_steps` steps of a process out when
more follow, and is measured over every step when there are too few to leave any out.
Before the first step every rank checks that it can write the checkpoint folder and that a
checkpoint fits (free space, the file-size limit); a save that fails anyway stops the run naming the
folder, with `latest` still naming the last complete checkpoint.

Best checkpoint and early stopping (optional; finetuning uses them, pretraining does not): with
`LoopSettings.best_metric` set (a key of the task's evaluation, e.g. "macro_f1" or "loss"), the loop
also evaluates at the last step, and each evaluation that improves the metric saves a checkpoint and
names it in `RUN/checkpoints/best` (JSON: tag, step, metric, value), written before `latest` and never
removed by the rotation. After `patience` evaluations in a row without improvement the loop saves a
checkpoint and stops. Resume restores the tracking: the best value comes from `best`, the count of
evaluations since from the evaluation steps after it. Each checkpoint also carries the best record
as it stood, and resume rewrites `best` from it, so a kill between the two files loses nothing. The value that decides is rank 0's, broadcast, so
every rank takes the same branch (a save is a collective).
"""
from __future__ import annotations

import glob
import json
import math
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.distributed import barrier
from pipeline.files import write_json
from pipeline.monitor import Monitor, memory_gb


class Task(Protocol):
    tokens_per_step: int  # tokens of one optimizer step across all ranks (for throughput)

    def next_batch(self) -> dict[str, torch.Tensor]: ...  # this rank's next micro-batch
    def loss(self, engine, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def evaluate(self, engine, split: str) -> dict[str, float]: ...  # averaged over ranks
    def state(self) -> dict: ...  # data position, restored by load_state on resume
    def load_state(self, state: dict) -> None: ...
    # With a pipeline engine (pipeline.stages > 1) the loop calls, instead of next_batch/loss:
    # `micro_batches()`, an endless iterator of this data-parallel replica's micro-batches as
    # (inputs, labels) tensors; DeepSpeed reads it on the first stage (inputs) and the last (labels).
    # Optional: `before_step(engine, step)` is called on the last micro-batch of each optimizer step, after
    # backward and before engine.step(): the reduced gradients are readable there (deepspeed.utils.safe_get_full_grad).


@dataclass
class LoopSettings:
    train_steps: int
    log_interval: int
    eval_interval: int
    save_interval: int
    keep_checkpoints: int
    checkpoint_dir: str
    warmup_steps: int = 2  # steps left out of the throughput figure (first-step allocation, warm caches)
    best_metric: str | None = None  # an evaluation metric whose best value names RUN/checkpoints/best (None: off)
    higher_is_better: bool = True   # for best_metric: accuracy yes, loss no
    patience: int = 0               # stop after this many evaluations without improvement (0: never stop early)


class NonFiniteLoss(RuntimeError):
    pass


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, file-size limit, unwritable folder)."""


# DeepSpeed's dynamic loss scaler raises a bare Exception with this text when fp16 gradients still
# overflow at the minimum scale; the loop turns it into a NonFiniteLoss with the step and a hint.
_LOSS_SCALE_AT_MINIMUM = "loss scale already at minimum"


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
    return sorted(tags, key=tag_step)


def tag_step(tag: str) -> int:
    return int(tag[len("global_step"):])


def incomplete_tags(checkpoint_dir: str) -> list[str]:
    """Checkpoint folders that no `latest` ever named: newer than the latest one (all, with no `latest`).
    They were being written when the run stopped."""
    latest = latest_tag(checkpoint_dir)
    if latest is None:
        return checkpoint_tags(checkpoint_dir)
    named = re.match(r"global_step(\d+)", latest)  # also global_stepN_universal
    if not named:
        return []  # a tag named by hand: nothing to compare with
    return [t for t in checkpoint_tags(checkpoint_dir) if tag_step(t) > int(named.group(1))]


def latest_tag(checkpoint_dir: str) -> str | None:
    path = os.path.join(checkpoint_dir, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path, encoding="utf-8").read().strip()
    if not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        raise FileNotFoundError(f"{path} names {tag!r}, which is missing; delete {path} to start over "
                                f"or point it at one of {checkpoint_tags(checkpoint_dir)}")
    return tag


BEST_FILE = "best"


def is_universal_checkpoint(folder: str) -> bool:
    """A checkpoint in DeepSpeed's universal format (tools/convert_checkpoint.py --to universal):
    per-parameter folders under zero/, no per-rank optimizer shards."""
    return os.path.isdir(os.path.join(folder, "zero")) and not any(
        name.endswith("optim_states.pt") for name in os.listdir(folder))


def resume_config(ds_config: dict, checkpoint_dir: str) -> dict:
    """The DeepSpeed config to initialize with: when `latest` names a universal checkpoint, DeepSpeed
    must load it as one (`checkpoint.load_universal`), which lets a run resume at another world size."""
    tag = latest_tag(checkpoint_dir)
    if tag and is_universal_checkpoint(os.path.join(checkpoint_dir, tag)):
        return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    return ds_config


def best_checkpoint(checkpoint_dir: str) -> dict | None:
    """The `best` record ({"tag", "step", "metric", "value"}) when the run tracks a best checkpoint."""
    path = os.path.join(checkpoint_dir, BEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_bytes(engine) -> int:
    """About what one checkpoint takes on disk, all ranks together: the weights in their training precision
    plus fp32 master weights and two Adam moments (12 bytes per parameter)."""
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    weight_bytes = 4 if not (engine.bfloat16_enabled() or engine.fp16_enabled()) else 2
    return params * (weight_bytes + 12)


def check_checkpoint_room(engine, settings: LoopSettings) -> None:
    """Fail before the first step, not at the first save: the checkpoint folder must be writable, a
    checkpoint must fit on its disk and under the file-size limit (`ulimit -f`)."""
    import resource

    if settings.save_interval <= 0:
        return
    folder = settings.checkpoint_dir
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test_rank{engine.global_rank}")
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {folder}: {e.strerror or e}; choose another --output "
                              "or fix the folder's permissions") from e
    need = checkpoint_bytes(engine)
    world = engine.world_size if hasattr(engine, "world_size") else 1
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CheckpointError(f"{folder} has {free / 2**20:,.0f} MB free, and one checkpoint of this model takes "
                              f"about {need / 2**20:,.0f} MB; free space or choose another --output")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    largest = need // max(1, world) if engine.zero_optimization_stage() > 0 else need
    if limit != resource.RLIM_INFINITY and limit < largest:
        raise CheckpointError(f"the file-size limit (ulimit -f) is {limit / 2**20:,.1f} MB, but a checkpoint file "
                              f"of this model takes about {largest / 2**20:,.1f} MB; raise the limit "
                              "(ulimit -f unlimited) or set --save-interval 0")


def deepspeed_safe_globals() -> list:
    """The classes besides tensors and containers that DeepSpeed 0.19 pickles into checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, mmap: bool = False):
    """torch.load that builds nothing but tensors, containers and DeepSpeed's checkpoint classes."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refusing to load: it holds objects other than tensors and DeepSpeed's checkpoint "
                         f"classes, which only an unsafe (code-running) unpickling would build ({reason}); export "
                         "only checkpoints from a source you trust") from None
    except RuntimeError as e:  # not a zip archive, truncated, ...
        raise ValueError(f"{path}: not a readable checkpoint file ({str(e).strip().splitlines()[0]})") from None


def save_checkpoint(engine, settings: LoopSettings, step: int, client_state: dict, best: dict | None = None) -> None:
    """`best`: name this checkpoint in RUN/checkpoints/best (written before `latest`)."""
    tag = f"global_step{step}"
    try:
        engine.save_checkpoint(settings.checkpoint_dir, tag=tag, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), os.path.join(settings.checkpoint_dir, tag, f"rng_rank{engine.global_rank}.pt"))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        previous = latest_tag(settings.checkpoint_dir)
        raise CheckpointError(
            f"could not write checkpoint {os.path.join(settings.checkpoint_dir, tag)} on rank {engine.global_rank}: "
            f"{e}. Nothing complete was lost: `latest` still names {previous or 'no checkpoint'}, and a rerun of the "
            "same command resumes from it once there is room (free space, raise `ulimit -f`)") from e
    barrier()  # every rank's files are on disk before `latest` may name them
    if engine.global_rank == 0:
        if best is not None:
            write_json(os.path.join(settings.checkpoint_dir, BEST_FILE), {**best, "tag": tag, "step": step})
        kept = (best_checkpoint(settings.checkpoint_dir) or {}).get("tag")
        tmp = os.path.join(settings.checkpoint_dir, "latest.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(settings.checkpoint_dir, "latest"))
        for old in checkpoint_tags(settings.checkpoint_dir)[:-settings.keep_checkpoints]:
            if old != kept:  # the best checkpoint outlives the rotation
                shutil.rmtree(os.path.join(settings.checkpoint_dir, old), ignore_errors=True)
    barrier()


class StartStep(int):
    """What `resume` returns: the step to continue from (an int, as the stages use it), carrying the train
    metrics the checkpoint recorded (`recorded`: train_loss, grad_norm, tokens_per_sec), so that a resumed run
    that logs nothing itself, or a rerun of a finished run, still reports them."""

    recorded: dict

    def __new__(cls, step: int, recorded: dict):
        start = super().__new__(cls, step)
        start.recorded = recorded
        return start


def resume(engine, task: Task, settings: LoopSettings) -> int:
    """Load `latest` when there is one; returns the step to continue from (0 for a fresh run), a `StartStep`
    when resuming. Checkpoint folders that `latest` never named were cut off mid-save: reported and removed."""
    partial = incomplete_tags(settings.checkpoint_dir)
    tag = latest_tag(settings.checkpoint_dir)
    barrier()  # every rank has looked before rank 0 removes anything
    if partial and engine.global_rank == 0:
        for t in partial:
            print(f"checkpoint {os.path.join(settings.checkpoint_dir, t)} is incomplete (the run stopped while "
                  f"writing it): removed; resuming from {tag or 'the start'}", flush=True)
            shutil.rmtree(os.path.join(settings.checkpoint_dir, t), ignore_errors=True)
    barrier()
    if tag is None:
        return 0
    # DeepSpeed unpickles checkpoint files in full (weights_only=False): check them weights-only first,
    # each rank a share of the files, so a file that would run code on load is refused before that.
    files = sorted(glob.glob(os.path.join(settings.checkpoint_dir, tag, "**", "*.pt"), recursive=True))
    for path in files[engine.global_rank::max(1, engine.world_size)]:
        load_weights_only(path, mmap=True)
    barrier()
    with torch.no_grad():  # a pipeline engine re-broadcasts tied weights in place while loading
        path, client_state = engine.load_checkpoint(settings.checkpoint_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {settings.checkpoint_dir}/{tag}")
    task.load_state(client_state["data"])
    rng_file = os.path.join(settings.checkpoint_dir, tag, f"rng_rank{engine.global_rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming at another world size: data order is still exact
        _set_rng_state(torch.load(rng_file, weights_only=True))
    if client_state.get("best") and engine.global_rank == 0:  # the record as it stood at this checkpoint
        write_json(os.path.join(settings.checkpoint_dir, BEST_FILE), client_state["best"])
    barrier()
    return StartStep(int(client_state["step"]), client_state.get("train") or {})


# ---------------------------------------------------------------- the loop

class _BestTracker:
    """Best value of settings.best_metric so far and the evaluations since; see the module doc."""

    def __init__(self, settings: LoopSettings, start_step: int, device: torch.device):
        self.settings, self.device = settings, device
        self.value, self.step, self.bad = None, None, 0
        record = best_checkpoint(settings.checkpoint_dir) if start_step else None
        if record is not None and record.get("metric") == settings.best_metric and record["step"] <= start_step:
            self.value, self.step = record["value"], record["step"]
            self.bad = sum(1 for s in self.eval_steps() if record["step"] < s <= start_step)

    def eval_steps(self) -> list[int]:
        s = self.settings
        steps = list(range(s.eval_interval, s.train_steps + 1, s.eval_interval)) if s.eval_interval > 0 else []
        return steps if s.train_steps in steps else steps + [s.train_steps]

    @property
    def exhausted(self) -> bool:
        return self.settings.patience > 0 and self.bad >= self.settings.patience

    def record(self) -> dict | None:
        """What `best` holds now; saved inside each checkpoint too."""
        if self.value is None:
            return None
        return {"metric": self.settings.best_metric, "value": self.value, "step": self.step,
                "tag": f"global_step{self.step}"}

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Whether this evaluation improved the metric (rank 0's value decides, for every rank)."""
        name = self.settings.best_metric
        if name not in metrics:
            raise ValueError(f"best metric {name!r} is not among the evaluation metrics {sorted(metrics)}")
        value = torch.tensor([metrics[name]], dtype=torch.float64, device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.broadcast(value, src=0)
        value = float(value)
        better = math.isfinite(value) and (self.value is None or (
            value > self.value if self.settings.higher_is_better else value < self.value))
        if better:
            self.value, self.step, self.bad = value, step, 0
        else:
            self.bad += 1
        return better


def is_pipeline_engine(engine) -> bool:
    """A DeepSpeed PipelineEngine (the model is a PipelineModule): train_batch/eval_batch, not forward."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Throughput:
    """Training tokens/s of the steps this process takes, evaluation and checkpoint time excluded: timed from the
    end of the first `warmup` steps (first-step allocation, warm caches) when more steps follow, else over every
    step taken (a resumed run that trains one or two steps still gets a figure)."""

    def __init__(self, tokens_per_step: int, warmup: int, device: torch.device):
        self.tokens_per_step, self.warmup, self.device = tokens_per_step, warmup, device
        self.steps, self.start, self.excluded = 0, time.perf_counter(), 0.0
        self.timed_steps, self.timed_start, self.timed_excluded = 0, self.start, 0.0

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.warmup:  # timed from here
            _sync(self.device)
            self.timed_start, self.timed_excluded = time.perf_counter(), 0.0
        elif self.steps > self.warmup:
            self.timed_steps += 1

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds
        self.timed_excluded += seconds

    def value(self) -> float | None:
        """Tokens/s so far; None before the first step."""
        if not self.steps:
            return None
        _sync(self.device)
        now = time.perf_counter()
        if self.timed_steps:
            steps, seconds = self.timed_steps, now - self.timed_start - self.timed_excluded
        else:
            steps, seconds = self.steps, now - self.start - self.excluded
        return steps * self.tokens_per_step / max(seconds, 1e-9)


def _step_metrics(engine, recent: torch.Tensor, accum: int) -> dict:
    """The loss of the optimizer step just taken (`recent`: summed over micro-batches), averaged over micro-batches
    and ranks, and the global gradient norm. A collective: every rank calls it at the same step."""
    values = torch.stack([recent / accum]).double()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    norm = engine.get_global_grad_norm()
    return {"train_loss": float(values[0]), "grad_norm": float(norm) if norm is not None else None}


def train(engine, task: Task, settings: LoopSettings, monitor: Monitor, start_step: int) -> dict:
    """Run optimizer steps start_step+1 .. train_steps. Returns the final train metrics.

    `start_step` is what `resume` returned: when it carries the metrics its checkpoint recorded, a run with
    nothing left to train (a rerun of a finished run) reports those instead of nothing."""
    device = engine.device
    accum = engine.gradient_accumulation_steps()
    step = start_step
    recent = torch.zeros((), device=device)  # loss of the last optimizer step, summed over micro-batches
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    recorded = getattr(start_step, "recorded", {})  # the checkpoint's train metrics (StartStep)
    last = {"train_loss": recorded.get("train_loss"), "grad_norm": recorded.get("grad_norm")}
    last_step = start_step  # the step whose metrics `last` holds
    interval_start, interval_steps, interval_excluded = time.perf_counter(), 0, 0.0
    tracker = _BestTracker(settings, start_step, device) if settings.best_metric else None
    before_step = getattr(task, "before_step", None)
    stopped = tracker is not None and tracker.exhausted  # a rerun of a run that had stopped early
    last_saved = start_step
    pipelined = is_pipeline_engine(engine)
    if pipelined:
        if before_step is not None:
            raise ValueError("a task with before_step cannot train with a pipeline engine: train_batch() runs the "
                             "whole step (forward, backward, optimizer step) in one call")
        micro_batches = task.micro_batches()  # lazy: the data position moves only as the engine reads

    check_checkpoint_room(engine, settings)
    throughput = _Throughput(task.tokens_per_step, settings.warmup_steps, device)
    while step < settings.train_steps and not stopped:
        recent.zero_()
        try:
            if pipelined:
                # One call runs the schedule of all `accum` micro-batches through all stages, the gradient
                # all-reduce and the optimizer step; it returns their mean loss, averaged over data-parallel
                # replicas, on every stage. Summed over micro-batches like the loop below: x accum.
                recent += engine.train_batch(micro_batches).detach().float() * accum
            for micro in range(0 if pipelined else accum):
                batch = task.next_batch()
                loss = task.loss(engine, batch)
                engine.backward(loss)
                if before_step is not None and micro == accum - 1:
                    before_step(engine, step + 1)
                engine.step()
                recent += loss.detach().float()
        except Exception as e:
            if _LOSS_SCALE_AT_MINIMUM not in str(e):
                raise
            raise NonFiniteLoss(
                f"fp16 gradients overflowed at step {step + 1} even at the minimum loss scale (the scale collapsed): "
                "train in bf16 (the configs without _fp16) if the hardware has it, lower the learning rate, raise "
                "warmup or gradient clipping, or check the data") from e
        step += 1
        interval_steps += 1
        throughput.step()
        # Remember the first non-finite step without a host sync; checked at log time.
        bad = ~torch.isfinite(recent)
        first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)

        is_log = step % settings.log_interval == 0 or step == settings.train_steps
        is_eval = settings.eval_interval > 0 and step % settings.eval_interval == 0
        is_eval = is_eval or (tracker is not None and step == settings.train_steps)  # the last model is a candidate
        is_save = settings.save_interval > 0 and step % settings.save_interval == 0
        if is_log or is_eval or is_save:
            if int(first_bad) >= 0:
                raise NonFiniteLoss(f"the training loss was not finite ({float(recent / accum)}) at step {int(first_bad)}: "
                                    "lower the learning rate, raise warmup, check the data, or use bf16 instead of fp16")
        if is_log:
            _sync(device)
            now = time.perf_counter()
            last.update(_step_metrics(engine, recent, accum))
            last_step = step
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
            tokens_per_sec = throughput.value()  # before evaluating and saving, which it leaves out
            t0 = time.perf_counter()
            best = None
            if is_eval:
                metrics = task.evaluate(engine, "valid")
                monitor.scalars(step, {f"Eval/{k}": v for k, v in metrics.items()})
                # Per-class figures go to TensorBoard and the task's own table, not onto this one line.
                headline = {k: v for k, v in metrics.items() if not k.startswith(("precision_", "recall_"))}
                monitor.print(f"step {step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in headline.items()))
                if tracker is not None:
                    if tracker.update(step, metrics):
                        is_save, best = True, {"metric": settings.best_metric, "value": tracker.value}
                        monitor.print(f"step {step:>6} | best {settings.best_metric} so far: {tracker.value:.4f}")
                    elif tracker.exhausted:
                        is_save, stopped = True, True
                        monitor.print(f"step {step:>6} | early stop: no better {settings.best_metric} in "
                                      f"{tracker.bad} evaluations (best {tracker.value:.4f} at step {tracker.step})")
            if is_save:
                if last_step != step:  # a save between log steps records this step's loss all the same
                    last.update(_step_metrics(engine, recent, accum))
                    last_step = step
                state = {"step": step, "data": task.state(), "best": tracker.record() if tracker else None,
                         "train": {**last, "tokens_per_sec": tokens_per_sec}}
                save_checkpoint(engine, settings, step, state, best=best)
                last_saved = step
            spent = time.perf_counter() - t0
            throughput.exclude(spent)
            interval_excluded += spent

    if last_step != step:  # stopped early between log steps: the last step's loss, not an older one
        last.update(_step_metrics(engine, recent, accum))
        last_step = step
    # Nothing trained in this process (a rerun of a finished run): the figure its checkpoint recorded.
    tokens_per_sec = throughput.value() if throughput.steps else recorded.get("tokens_per_sec")
    if settings.save_interval > 0 and step % settings.save_interval != 0 and step > last_saved:
        state = {"step": step, "data": task.state(), "best": tracker.record() if tracker else None,
                 "train": {**last, "tokens_per_sec": tokens_per_sec}}
        save_checkpoint(engine, settings, step, state)  # the final state
    result = {"steps": step, "train_loss": last["train_loss"], "grad_norm": last["grad_norm"],
              "tokens_per_sec": tokens_per_sec, "perplexity": math.exp(min(last["train_loss"] or 0.0, 50.0))}
    if tracker is not None:
        result.update(best_metric=settings.best_metric, best_value=tracker.value, best_step=tracker.step,
                      stopped_early=stopped)
    return result
