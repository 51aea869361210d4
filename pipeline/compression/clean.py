"""Make the compression real: masks and fake quantization baked into the weights, pruned heads and
MLP channels cut out of the architecture.

`clean(model, compressor)` takes the model as it trained (wrappers and all, any dtype) and returns:
- `hf_model`: a plain transformers model in float32 whose config describes every cut it holds, so it
  saves with `save_pretrained` and loads with `from_pretrained`. Cuts a HF config can describe:
  dropped layers (done before training), MLP channels when every layer keeps the same number
  (`intermediate_size` / `n_inner`), and, for Llama-type models, attention heads when every layer
  keeps the same number (`num_attention_heads`, `num_key_value_heads`, explicit `head_dim`). Other
  cuts (BERT heads, counts that differ by layer) stay as zeroed weights here: the same outputs.
  Quantized weights hold their dequantized values (what the training forward used).
- `model`: the same with every cut made (BERT heads too): what `save_compressed` stores as integers.
- `storage`: per module, the quantization scheme, activation bits and sparsity to store it with.

Nothing of DeepSpeed survives: both models are built fresh from the config and a state dict.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.compression.arch import arch_of, kind_of
from pipeline.compression.compressor import Compressor
from pipeline.compression.modules import CompressedEmbedding, CompressedLinear, wrappers
from pipeline.compression.plan import ModulePlan
from pipeline.compression.rebuild import build

MASKS = ("sparse_mask", "row_mask", "col_mask")


@dataclass
class Cleaned:
    hf_model: nn.Module
    model: nn.Module
    storage: dict[str, ModulePlan]
    notes: list[str] = field(default_factory=list)


def effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model that computes what `model` computes now, in float32."""
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items() if not k.endswith(MASKS)}
    with torch.no_grad():
        for name, w in wrappers(model).items():
            weight = w.effective_weight(dtype=torch.float32)
            if isinstance(w, CompressedLinear) and w.kind == "conv1d":
                weight = weight.t()
            state[f"{name}.weight"] = weight.contiguous()
            if isinstance(w, CompressedLinear) and w.bias is not None:
                state[f"{name}.bias"] = w.effective_bias().detach().float().clone()
    return state


def _kinds(model: nn.Module) -> dict[str, str]:
    kinds = {}
    for name, m in model.named_modules():
        if isinstance(m, CompressedLinear):
            kinds[name] = m.kind
        elif isinstance(m, CompressedEmbedding):
            kinds[name] = "embedding"
        elif kind_of(m):
            kinds[name] = kind_of(m)
    return kinds


def _take(state: dict, name: str, kind: str, index: torch.Tensor, axis: str) -> None:
    """Keep rows (output channels) or cols (input channels) `index` of a module's weight (and bias for rows)."""
    key = f"{name}.weight"
    dim = {"rows": 0, "cols": 1}[axis]
    if kind == "conv1d":  # weight (in, out)
        dim = 1 - dim
    state[key] = state[key].index_select(dim, index).contiguous()
    if axis == "rows" and f"{name}.bias" in state:
        state[f"{name}.bias"] = state[f"{name}.bias"].index_select(0, index).contiguous()


def _uniform(kept: dict[int, list[int]], layers: int) -> int | None:
    """The common count when every layer is cut to the same number, else None."""
    counts = {len(v) for v in kept.values()}
    return counts.pop() if len(kept) == layers and len(counts) == 1 else None


def clean(model: nn.Module, compressor: Compressor) -> Cleaned:
    compressor.finalize()
    plan = compressor.plan
    state = effective_state(model)
    kinds = _kinds(model)
    config = copy.deepcopy(model.config)
    notes = list(plan.notes)
    heads, rows = compressor.kept_units(), compressor.kept_rows()
    arch, layers = None, None
    if heads or rows:
        arch = arch_of(model, "structured pruning")
        layers = getattr(config, arch.num_layers_key)

    full, hf = dict(state), dict(state)
    blocks = {b.layer: b for b, _ in plan.heads}
    heads_in_hf = bool(heads) and arch.heads_in_config and _uniform(heads, layers) is not None
    for layer, units in heads.items():
        b = blocks[layer]
        for target in ([full, hf] if heads_in_hf else [full]):
            for name in (b.q,):
                _take(target, name, kinds[name], b.q_rows(units), "rows")
            for name in (b.k, b.v):
                _take(target, name, kinds[name], b.kv_rows(units), "rows")
            _take(target, b.o, kinds[b.o], b.q_rows(units), "cols")
    if heads_in_hf:
        b = plan.heads[0][0]
        units = _uniform(heads, layers)
        config.num_attention_heads = units * (b.heads // b.kv_heads)
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = units
        config.head_dim = b.head_dim
    elif heads:
        notes.append("pruned attention heads are cut in the compressed model; this model type's config cannot "
                     "describe them, so the HF export keeps them as zero weights (same outputs)")

    mlps = {b.layer: b for b, _ in plan.rows}
    rows_in_hf = bool(rows) and _uniform(rows, layers) is not None
    for layer, channels in rows.items():
        b, index = mlps[layer], torch.tensor(channels, dtype=torch.long)
        for target in ([full, hf] if rows_in_hf else [full]):
            for name in b.rows:
                _take(target, name, kinds[name], index, "rows")
            _take(target, b.out, kinds[b.out], index, "cols")
    if rows_in_hf:
        setattr(config, arch.intermediate_key, _uniform(rows, layers))
    elif rows:
        notes.append("MLP channels are cut in the compressed model; the layers keep different numbers, which a HF "
                     "config cannot describe, so the HF export keeps them as zero weights (same outputs)")

    cls = type(model)
    hf_model = build(cls, config, hf)
    compact = hf_model if (heads_in_hf or not heads) and (rows_in_hf or not rows) else build(cls, config, full)
    storage = {n: p for n, p in plan.modules.items()
               if p.storage_scheme or p.act_bits or p.dense_ratio is not None}
    return Cleaned(hf_model, compact, storage, notes)
