"""Writing results so that nothing half-written ever looks complete: temporary name, then rename.

Light on purpose (standard library only): the prepare stage imports it without torch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys


def write_json(path: str, data: dict) -> None:
    """JSON written under a temporary name and renamed: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def publish_folder(tmp: str, output: str) -> None:
    """Move the finished folder `tmp` to `output`. An existing `output` is moved aside first and removed
    after, so at every moment `output` is either the old complete folder or the new one."""
    if os.path.lexists(output):
        old = output.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(output, old)
        os.rename(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, output)


def check_output_folder(path: str, flag: str = "--output") -> None:
    """A run folder must be a folder, or not exist yet: found before any process group starts, not when rank 0
    first writes into it."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: exists and is not a folder; choose another {flag}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is not a folder; choose another {flag}")


def start_run_folder(output: str, ds_config: dict, args, warnings: list[str]) -> None:
    """Rank 0 of a training stage: create the run folder, print the config warnings once, and record
    the resolved DeepSpeed JSON and the stage's arguments (`args`: its dataclass)."""
    os.makedirs(output, exist_ok=True)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    write_json(os.path.join(output, "ds_config.json"), ds_config)
    write_json(os.path.join(output, "args.json"), dataclasses.asdict(args))
