"""Training-time wrappers: a Linear (or GPT-2 Conv1D) or an Embedding that trains compressed.

A wrapper replaces the module in its parent and owns the same `weight` / `bias` Parameters (same
names, same objects: tied weights stay tied, the optimizer sees the same tensors). In forward it
applies, in this order, to the weight seen as (out, in):

    w = weight * sparse_mask * row_mask[:, None] * col_mask[None, :]    # pruning masks (buffers)
    w = fake_quantize(w)                                                 # once quantization is on
    y = linear(fake_quantize_activation(x), w, bias * row_mask)          # activation quantization

Masks are persistent buffers created when a method selects the module, so they are part of every
checkpoint; whether quantization is on is set each step by the Compressor from the step number.
A pruned output row has a zero weight row and a zero bias: its channel is exactly 0, so what reads
it (an MLP's output projection, a head's value path) gets nothing from it and the row can be cut.

Grouped quantization of a module whose input columns are pruned quantizes the kept columns only
(groups over the compacted matrix): exactly what the cleaned model, with those columns cut, stores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.compression.arch import out_in
from pipeline.compression.quant import fake_quantize, fake_quantize_activation
from pipeline.compression.schema import QuantScheme


class CompressedLinear(nn.Module):
    def __init__(self, module: nn.Module, kind: str):
        super().__init__()
        self.kind = kind  # "linear" or "conv1d"
        self.weight = module.weight
        self.bias = module.bias
        self.out_features, self.in_features = out_in(self.weight, kind).shape
        self.scheme: QuantScheme | None = None
        self.quant_on = False
        self.act_bits: int | None = None
        self.act_symmetric = False
        self.act_on = False
        for which in ("sparse", "row", "col"):  # buffers (in checkpoints) once a method creates them
            self.register_buffer(f"{which}_mask", None)

    def add_mask(self, which: str) -> None:
        """Create the `sparse` (out, in), `row` (out,) or `col` (in,) mask, all ones."""
        shape = {"sparse": (self.out_features, self.in_features), "row": (self.out_features,),
                 "col": (self.in_features,)}[which]
        if getattr(self, f"{which}_mask") is None:
            setattr(self, f"{which}_mask", torch.ones(shape, dtype=self.weight.dtype, device=self.weight.device))

    def masked_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = out_in(self.weight, self.kind)
        w = w if dtype is None else w.to(dtype)
        # Masks keep the dtype they were made in (DeepSpeed casts parameters to bf16/fp16, not buffers).
        if self.sparse_mask is not None:
            w = w * self.sparse_mask.to(w.dtype)
        if self.row_mask is not None:
            w = w * self.row_mask.to(w.dtype)[:, None]
        if self.col_mask is not None:
            w = w * self.col_mask.to(w.dtype)[None, :]
        return w

    def effective_weight(self, quantized: bool | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as the forward pass uses it, (out, in) (in `dtype`: cleaning computes in float32)."""
        w = self.masked_weight(dtype)
        if self.scheme is None or not (self.quant_on if quantized is None else quantized):
            return w
        if self.col_mask is not None and self.scheme.group_size and not bool(self.col_mask.all()):
            keep = self.col_mask.nonzero().squeeze(1)
            return w.new_zeros(w.shape).index_copy(1, keep, fake_quantize(w[:, keep], self.scheme))
        return fake_quantize(w, self.scheme)

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.row_mask is None:
            return self.bias
        return self.bias * self.row_mask.to(self.bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_on:
            x = fake_quantize_activation(x, self.act_bits, self.act_symmetric)
        return F.linear(x, self.effective_weight(), self.effective_bias())

    def extra_repr(self) -> str:
        parts = [f"{self.kind} {self.in_features}->{self.out_features}"]
        if self.scheme:
            parts.append(f"w{self.scheme.bits}{'' if self.quant_on else ' (off)'}")
        if self.act_bits:
            parts.append(f"a{self.act_bits}{'' if self.act_on else ' (off)'}")
        parts += [f"{m}_mask" for m in ("sparse", "row", "col") if getattr(self, f"{m}_mask") is not None]
        return ", ".join(parts)


class CompressedEmbedding(nn.Module):
    """An Embedding whose table is fake-quantized per row (a tied output head quantizes the same way)."""

    def __init__(self, module: nn.Embedding):
        super().__init__()
        self.weight = module.weight
        self.num_embeddings, self.embedding_dim = module.num_embeddings, module.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = module.padding_idx, module.max_norm, module.norm_type
        self.scale_grad_by_freq, self.sparse = module.scale_grad_by_freq, module.sparse
        self.scheme: QuantScheme | None = None
        self.quant_on = False

    def effective_weight(self, quantized: bool | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.weight if dtype is None else self.weight.to(dtype)
        if self.scheme is None or not (self.quant_on if quantized is None else quantized):
            return w
        return fake_quantize(w, self.scheme)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.effective_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        bits = f", w{self.scheme.bits}{'' if self.quant_on else ' (off)'}" if self.scheme else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{bits}"


def wrap(model: nn.Module, name: str) -> nn.Module:
    """Replace module `name` by its wrapper (once) and return the wrapper."""
    from pipeline.compression.arch import kind_of

    module = model.get_submodule(name)
    if isinstance(module, (CompressedLinear, CompressedEmbedding)):
        return module
    kind = kind_of(module)
    wrapper = CompressedEmbedding(module) if kind == "embedding" else CompressedLinear(module, kind)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, wrapper)
    return wrapper


def wrappers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (CompressedLinear, CompressedEmbedding))}
