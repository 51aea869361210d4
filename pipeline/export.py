"""Export a trained model to the HuggingFace format: `RUN/hf/` loads with `AutoModel*.from_pretrained`.

From a live engine (the end of every stage) or from any saved checkpoint of a run
(`tools/export_checkpoint.py`). Weights are written as safetensors; ZeRO-3's partitioned
parameters, or a pipeline's stages (pipeline/models/pipe.py maps their layers to HF names), are
gathered first. The folder is written under a temporary name and renamed.
"""
from __future__ import annotations

import shutil

import torch

from pipeline.distributed import barrier
from pipeline.files import publish_folder


def save_hf(model, tokenizer, out_dir: str, state_dict: dict | None = None) -> None:
    """save_pretrained (safetensors) + the tokenizer, atomically. Call on one rank."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True  # training turned it off; generation wants it
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    model.config.use_cache = False
    if tokenizer is not None:
        tokenizer.save_hf(tmp)
    publish_folder(tmp, out_dir)


def export_hf(engine, tokenizer, out_dir: str, hf_model=None) -> None:
    """Write the engine's model to out_dir from rank 0. Every rank must call it (ZeRO-3 and pipeline
    stages gather). For a pipeline engine, hf_model is the HF model its layers were built from: its
    class and config are saved, with the weights gathered from every stage (the same HF format as a
    non-pipeline run)."""
    from pipeline.training import is_pipeline_engine

    if is_pipeline_engine(engine):
        from pipeline.models.pipe import gather_hf_state_dict

        if hf_model is None:
            raise ValueError("export_hf of a pipeline engine needs the HF model its layers were built from")
        state_dict = gather_hf_state_dict(engine, hf_model.config)  # a collective; None except on rank 0
        if engine.global_rank == 0:
            save_hf(hf_model, tokenizer, out_dir, state_dict)
        barrier()
        return
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
    return cls.from_pretrained(path, dtype=dtype or "auto", trust_remote_code=False)
