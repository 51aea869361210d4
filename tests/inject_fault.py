"""Run a training stage with one fault injected into one rank, from outside the stage's code:

    FAULT=KIND:STEP:RANK deepspeed --num_gpus 2 tests/inject_fault.py pretrain ARGS...

KIND is where the rank dies (SIGKILL, as a preempted node or the OOM killer would do it) or raises:
  step     after optimizer step STEP
  raise    raise an exception after optimizer step STEP (the rank fails, the others wait in a collective)
  pause    print "PAUSED at step STEP" after that step and sleep (the test then kills the launcher)
  save     inside DeepSpeed's save of checkpoint STEP, before this rank's optimizer-state file
  rng      after DeepSpeed's files of checkpoint STEP, before this rank's RNG file
  latest   on rank 0 just before `latest` would name checkpoint STEP
  rotate   on rank 0 after `latest` names checkpoint STEP, while old checkpoints are being removed
  eval     during the evaluation at step STEP
  load     while loading the checkpoint on resume (STEP ignored)
  full     the disk fills during the save of checkpoint STEP: torch.save raises ENOSPC for its files, on every
           rank (a node's ranks share the disk; RANK ignored, write `all`)
Everything is done by patching library functions in this wrapper: the stage's code has no test hooks.
"""
import errno
import importlib
import os
import shutil
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for `pipeline`

import torch  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402

from pipeline.cli import run_main  # noqa: E402

kind, step, rank = os.environ["FAULT"].split(":")
step, rank = int(step), (None if rank == "all" else int(rank))
steps_done = 0


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def patch_step() -> None:
    original = DeepSpeedEngine.step

    def step_then_fail(self, *args, **kwargs):
        global steps_done
        result = original(self, *args, **kwargs)
        steps_done = self.global_steps  # restored from the checkpoint on resume
        if steps_done == step and kind in ("step", "raise", "pause"):
            if kind == "raise":
                raise RuntimeError(f"injected failure on rank {rank} at step {step}")
            if kind == "pause":  # hold this rank (its peers block in the next collective) until killed
                print(f"PAUSED at step {step}", flush=True)
                time.sleep(600)
            die()
        return result

    DeepSpeedEngine.step = step_then_fail


def patch_save() -> None:
    original = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        path = str(f)
        if f"global_step{step}{os.sep}" in path:
            if (kind == "save" and "optim_states" in path) or (kind == "rng" and "rng_rank" in path):
                die()
            if kind == "full":
                raise OSError(errno.ENOSPC, "No space left on device", path)
        return original(obj, f, *args, **kwargs)

    torch.save = save_then_fail


def patch_latest() -> None:
    original_replace, original_rmtree = os.replace, shutil.rmtree

    def replace(src, dst, *args, **kwargs):
        if kind == "latest" and str(dst).endswith(os.sep + "latest") and open(src).read().strip() == f"global_step{step}":
            die()
        result = original_replace(src, dst, *args, **kwargs)
        if kind == "rotate" and str(dst).endswith(os.sep + "latest") and open(dst).read().strip() == f"global_step{step}":
            shutil.rmtree = rmtree_then_die
        return result

    def rmtree_then_die(path, *args, **kwargs):
        # Remove part of the folder, then die: a half-deleted old checkpoint.
        names = sorted(os.listdir(path))
        for name in names[: len(names) // 2]:
            full = os.path.join(path, name)
            (original_rmtree if os.path.isdir(full) else os.remove)(full)
        die()

    os.replace = replace


def patch_eval(module) -> None:
    cls = module.PretrainTask
    original = cls.evaluate

    def evaluate_then_fail(self, engine, split):
        if steps_done == step:
            die()
        return original(self, engine, split)

    cls.evaluate = evaluate_then_fail


def patch_load() -> None:
    original = torch.load

    def load_then_fail(f, *args, **kwargs):
        if "global_step" in str(f):
            die()
        return original(f, *args, **kwargs)

    torch.load = load_then_fail


# The launcher puts --local_rank=N first; the stage reads the rank from the environment.
stage, *argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
module = importlib.import_module(f"pipeline.{stage}")
if rank is None or int(os.environ["RANK"]) == rank:
    if kind in ("step", "raise", "pause", "eval"):
        patch_step()
    if kind in ("save", "rng", "full"):
        patch_save()
    if kind in ("latest", "rotate"):
        patch_latest()
    if kind == "eval":
        patch_eval(module)
    if kind == "load":
        patch_load()
run_main(lambda: module.main(argv), stage)
