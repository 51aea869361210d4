"""Export a trained model to the HuggingFace format: `RUN/hf/` loads with `AutoModel*.from_pretrained`.

From a live engine (the end of every stage) or from any saved checkpoint of a run
(`tools/export_checkpoint.py`). Weights are written as safetensors; ZeRO-3's partitioned
parameters are gathered first. The folder is written under a temporary name and renamed.
"""
from __future__ import annotations

import os
import shutil

import torch

from pipeline.distributed import barrier


def _publish(tmp: str, out_dir: str) -> None:
    """Replace out_dir with the finished tmp folder."""
    if os.path.isdir(out_dir):
        old = out_dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def save_hf(model, tokenizer, out_dir: str, state_dict: dict | None = None) -> None:
    """save_pretrained (safetensors) + the tokenizer, atomically. Call on one rank."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True  # training turned it off; generation wants it
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    model.config.use_cache = False
    if tokenizer is not None:
        tokenizer.save_hf(tmp)
    _publish(tmp, out_dir)


def export_hf(engine, tokenizer, out_dir: str) -> None:
    """Write the engine's model to out_dir from rank 0. Every rank must call it (ZeRO-3 gathers)."""
    state_dict = None
    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective; full tensors on rank 0
    if engine.global_rank == 0:
        model = engine.module
        if state_dict is None:
            state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_hf(model, tokenizer, out_dir, state_dict)
    barrier()


def load_hf(path: str, objective: str, dtype: torch.dtype | None = None):
    """Load an exported model for evaluation or generation."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM
    return cls.from_pretrained(path, dtype=dtype or "auto")
