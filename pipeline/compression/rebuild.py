"""A HuggingFace model rebuilt from its class, its config and a state dict whose Linear shapes may be
smaller than the config says (heads or channels cut where the config cannot describe it, e.g. BERT's
head size is tied to hidden_size / num_attention_heads).

The model is constructed without weight initialization (the state dict fills every weight), each
Linear / Conv1D whose weight in the state has another shape is replaced by one of that shape, and
the state is loaded. BERT's and Llama's attention read the number of heads from the projection's
output size (`view(..., -1, head_dim)`), so a layer with fewer heads runs as it is.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from pipeline.compression.arch import kind_of


def construct(cls, config) -> nn.Module:
    """An fp32 model of class `cls` (a transformers class or its name) with uninitialized weights."""
    import transformers

    if isinstance(cls, str):
        cls = getattr(transformers, cls)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialize, only slower
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = cls._from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # skipped with the initialization
    return model


def reshape_modules(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Replace every Linear / Conv1D whose weight in `state` has another shape; returns their names."""
    from transformers.pytorch_utils import Conv1D

    changed = []
    for name, module in list(model.named_modules()):
        kind = kind_of(module)
        key = f"{name}.weight"
        if kind not in ("linear", "conv1d") or key not in state or state[key].shape == module.weight.shape:
            continue
        rows, cols = state[key].shape
        bias = f"{name}.bias" in state
        if kind == "linear":
            new = nn.Linear(cols, rows, bias=bias, device="meta")
        else:
            new = Conv1D(cols, rows)  # Conv1D(nf=out, nx=in) holds weight (in, out) = (rows, cols)
        new.to_empty(device="cpu")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        changed.append(name)
    return changed


def build(cls, config, state: dict[str, torch.Tensor]) -> nn.Module:
    """The model with exactly the weights of `state` (every key must be used, none missing)."""
    model = construct(cls, config)
    reshape_modules(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()
