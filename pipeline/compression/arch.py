"""Where the parts of a HuggingFace transformer are: its layer list, each layer's attention
projections and MLP, and the config keys that size them.

Supported: Llama (and the Llama-shaped mistral, qwen2), BERT, GPT-2. Any model works with weight and
activation quantization and sparse pruning (they only need Linear / GPT-2 Conv1D / Embedding modules
found by name); head pruning, row pruning and layer reduction need to know the architecture:

| model_type | layers | attention q, k, v, o | MLP rows -> out | heads in config |
|---|---|---|---|---|
| llama, mistral, qwen2 | `*.layers` | `self_attn.{q,k,v,o}_proj` | `mlp.gate_proj`, `mlp.up_proj` -> `mlp.down_proj` | yes (`head_dim`) |
| bert | `*.encoder.layer` | `attention.self.{query,key,value}`, `attention.output.dense` | `intermediate.dense` -> `output.dense` | no |
| gpt2 | `*.h` | (fused `c_attn`: no head pruning) | `mlp.c_fc` -> `mlp.c_proj` | no |

"Heads in config" says whether a HF config can describe fewer heads per layer: Llama's can
(`num_attention_heads`, `num_key_value_heads` and an explicit `head_dim`), BERT's cannot (its head
size is hidden_size / num_attention_heads). The MLP width is a config key for all three.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    layers_suffix: str                                     # the layer ModuleList's name ends with this
    num_layers_key: str                                    # config key of the layer count
    attention: tuple[str, str, str, str, str] | None       # (attention module, q, k, v, o), relative to a layer
    mlp: tuple[str, tuple[str, ...], str]                  # (MLP module, row projections, output projection)
    intermediate_key: str                                  # config key of the MLP width
    heads_in_config: bool


_LLAMA = ArchSpec("layers", "num_hidden_layers",
                  ("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                  ("mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"), "intermediate_size", True)
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "bert": ArchSpec("encoder.layer", "num_hidden_layers",
                     ("attention", "attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense"),
                     ("intermediate", ("intermediate.dense",), "output.dense"), "intermediate_size", False),
    "gpt2": ArchSpec("h", "n_layer", None, ("mlp", ("mlp.c_fc",), "mlp.c_proj"), "n_inner", False),
}


def kind_of(module: nn.Module) -> str | None:
    """'linear', 'conv1d' (GPT-2's Linear with a transposed weight), 'embedding', or None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def out_in(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The weight as (out, in) (a view): Conv1D stores (in, out)."""
    return weight.t() if kind == "conv1d" else weight


def arch_of(model: nn.Module, what: str) -> ArchSpec:
    model_type = model.config.model_type
    if model_type not in ARCHS:
        raise ValueError(f"{what} needs to know the model's layout; model type {model_type!r} is not one of "
                         f"{', '.join(sorted(ARCHS))} (weight/activation quantization and sparse pruning work on any model)")
    return ARCHS[model_type]


def layer_list(model: nn.Module, arch: ArchSpec) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the transformer layers, e.g. ('model.layers', ...)."""
    count = getattr(model.config, arch.num_layers_key)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == arch.layers_suffix or name.endswith("." + arch.layers_suffix)) \
                and len(module) == count:
            return name, module
    raise ValueError(f"no layer list '*.{arch.layers_suffix}' of {count} layers in this {model.config.model_type} model")


def head_geometry(config) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dim) of every layer."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


@dataclass(frozen=True)
class AttentionBlock:
    """One layer's attention. The pruning unit is a key/value head with the query heads that share it
    (a single head without grouped-query attention), so the query/key-value ratio stays whole."""
    layer: int
    module: str
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def names(self) -> tuple[str, ...]:
        return self.module, self.q, self.k, self.v, self.o

    @property
    def units(self) -> int:
        return self.kv_heads

    def q_rows(self, units: list[int]) -> torch.Tensor:
        """Rows of q (= columns of o) of these units."""
        per = self.heads // self.kv_heads * self.head_dim
        return torch.cat([torch.arange(u * per, (u + 1) * per) for u in units]) if units else torch.zeros(0, dtype=torch.long)

    def kv_rows(self, units: list[int]) -> torch.Tensor:
        d = self.head_dim
        return torch.cat([torch.arange(u * d, (u + 1) * d) for u in units]) if units else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class MLPBlock:
    """One layer's MLP: `rows` make the intermediate channels (their output rows), `out` reads them
    (its input columns)."""
    layer: int
    module: str
    rows: tuple[str, ...]
    out: str
    width: int

    @property
    def names(self) -> tuple[str, ...]:
        return (self.module, *self.rows, self.out)


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    arch = arch_of(model, "head_pruning")
    if arch.attention is None:
        raise ValueError(f"head_pruning is not supported for {model.config.model_type} (its attention projections are "
                         "fused); use row_pruning, sparse_pruning or quantization")
    prefix, layers = layer_list(model, arch)
    heads, kv, head_dim = head_geometry(model.config)
    return [AttentionBlock(i, *(f"{prefix}.{i}.{n}" for n in arch.attention), heads=heads, kv_heads=kv,
                           head_dim=head_dim) for i in range(len(layers))]


def mlp_blocks(model: nn.Module) -> list[MLPBlock]:
    arch = arch_of(model, "row_pruning")
    prefix, layers = layer_list(model, arch)
    module, rows, out = arch.mlp
    width = getattr(model.config, arch.intermediate_key, None) or 4 * model.config.hidden_size  # GPT-2's n_inner None
    return [MLPBlock(i, f"{prefix}.{i}.{module}", tuple(f"{prefix}.{i}.{r}" for r in rows), f"{prefix}.{i}.{out}", width)
            for i in range(len(layers))]


def reduce_layers(model: nn.Module, keep: list[int], prefix: str | None = None) -> None:
    """Keep only the layers `keep` (teacher indices, increasing), in place: the layer list, the config's
    layer count, per-layer config lists (layer_types) and each module's `layer_idx` (caches use it)."""
    arch = arch_of(model, "layer_reduction")
    name, layers = layer_list(model, arch)
    if prefix is not None and prefix != name:
        raise ValueError(f"layer_reduction.module_name_prefix {prefix!r} is not this model's layer list {name!r}")
    if keep[-1] >= len(layers):
        raise ValueError(f"layer_reduction.teacher_layer {list(keep)} names layer {keep[-1]}, but the model has "
                         f"{len(layers)} layers (0-{len(layers) - 1})")
    if len(keep) >= len(layers):
        raise ValueError(f"layer_reduction keeps {len(keep)} of {len(layers)} layers: nothing is removed")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, kept)
    setattr(model.config, arch.num_layers_key, len(keep))
    for key in ("layer_types",):
        values = getattr(model.config, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(model.config, key, [values[i] for i in keep])
