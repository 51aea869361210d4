"""Match a parsed compression config against a model: which module gets which treatment.

Patterns are searched in the qualified module names of the model being compressed (the student:
after layer_reduction its layers are renumbered 0..k-1). Each method looks at its own kind of module:

| method | a pattern selects |
|---|---|
| weight_quantization, post_training_quantization | Linear, GPT-2 Conv1D and Embedding modules |
| activation_quantization, sparse_pruning | Linear and Conv1D modules |
| head_pruning | a layer's attention, when the pattern is found in the attention module's name or one of its q/k/v/o projections |
| row_pruning | a layer's MLP, when found in the MLP module's name or one of its projections |

Errors name the config key and the pattern: a pattern that selects nothing, a module in two groups of
one method, a ratio that keeps nothing, a module both trained quantized and post-training quantized,
activation quantization without weight quantization (the int8 kernels multiply int8 by int8).
A weight shared by an embedding and an output head (tied) is one tensor: selecting either module for
quantization quantizes both the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from pipeline.compression.arch import AttentionBlock, MLPBlock, attention_blocks, head_geometry, kind_of, mlp_blocks
from pipeline.compression.schema import CompressionConfig, CompressionConfigError, Method, QuantScheme


@dataclass
class ModulePlan:
    kind: str                          # linear, conv1d, embedding
    scheme: QuantScheme | None = None  # quantization-aware training
    ptq: QuantScheme | None = None     # post-training quantization
    act_bits: int | None = None
    act_symmetric: bool = False
    dense_ratio: float | None = None   # sparse pruning target

    @property
    def storage_scheme(self) -> QuantScheme | None:
        return self.scheme or self.ptq


@dataclass
class Plan:
    modules: dict[str, ModulePlan] = field(default_factory=dict)
    heads: list[tuple[AttentionBlock, int]] = field(default_factory=list)  # (layer's attention, units kept)
    rows: list[tuple[MLPBlock, int]] = field(default_factory=list)         # (layer's MLP, channels kept)
    notes: list[str] = field(default_factory=list)

    def describe(self, limit: int = 3) -> str:
        """What each module gets, modules with the same treatment on one line."""
        same: dict[str, list[str]] = {}
        for name, p in self.modules.items():
            what = []
            if p.scheme:
                what.append(f"QAT int{p.scheme.bits}" + (f" g{p.scheme.group_size}" if p.scheme.group_size else "")
                            + ("" if p.scheme.symmetric else " asym"))
            if p.ptq:
                what.append(f"PTQ int{p.ptq.bits}" + (f" g{p.ptq.group_size}" if p.ptq.group_size else ""))
            if p.act_bits:
                what.append(f"act int{p.act_bits}")
            if p.dense_ratio is not None:
                what.append(f"sparse {p.dense_ratio:.0%} kept")
            same.setdefault(", ".join(what), []).append(name)
        lines = []
        for what, names in same.items():
            shown = ", ".join(names[:limit]) + (f", ... ({len(names)} modules)" if len(names) > limit else "")
            lines.append(f"  {what}: {shown}")
        for block, kept in self.heads:
            lines.append(f"  layer {block.layer} attention: keep {kept} of {block.units} "
                         f"{'heads' if block.heads == block.kv_heads else 'key/value head groups'}")
        for block, kept in self.rows:
            lines.append(f"  layer {block.layer} MLP: keep {kept} of {block.width} channels")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


KINDS = {"weight_quantization": ("linear", "conv1d", "embedding"),
         "post_training_quantization": ("linear", "conv1d", "embedding"),
         "activation_quantization": ("linear", "conv1d"),
         "sparse_pruning": ("linear", "conv1d")}


def resolve(model: nn.Module, config: CompressionConfig) -> Plan:
    plan = Plan()
    modules = {name: kind_of(m) for name, m in model.named_modules()}
    modules = {name: kind for name, kind in modules.items() if kind}
    tied = _tied_groups(model, modules)
    for method in config.grouped:
        if method.name in KINDS:
            _module_method(model, method, modules, tied, plan)
        elif method.name == "head_pruning":
            plan.heads = _blocks(model, method, attention_blocks(model), lambda b: b.units, "key/value head units")
            heads, _, _ = head_geometry(model.config)
            if method.num_heads is not None and method.num_heads != heads:
                raise CompressionConfigError(f"compression.head_pruning.shared_parameters.num_heads is {method.num_heads} "
                                             f"but the model has {heads} attention heads per layer")
        else:
            plan.rows = _blocks(model, method, mlp_blocks(model), lambda b: b.width, "MLP channels")
    for name, p in plan.modules.items():
        if p.act_bits and not p.storage_scheme:
            raise CompressionConfigError(
                f"compression.activation_quantization selects {name}, whose weights no weight_quantization or "
                "post_training_quantization group quantizes: int8 activations need int8 weights (add the module there)")
        if p.scheme and p.ptq:
            raise CompressionConfigError(f"{name} is selected by both weight_quantization and post_training_quantization; "
                                         "choose one")
    return plan


def _selected(method: Method, group_index: int, candidates: dict[str, tuple[str, ...]], what: str,
              model_type: str) -> set[str]:
    """Keys of `candidates` (key -> names to search) matched by any pattern of the group."""
    group = method.groups[group_index]
    path = f"compression.{method.name}.different_groups.{group.name}.modules"
    chosen: set[str] = set()
    for pattern in group.modules:
        hits = {key for key, names in candidates.items() if pattern == "*" or any(re.search(pattern, n) for n in names)}
        if not hits:
            examples = ", ".join(n for names in list(candidates.values())[:2] for n in names[:3])
            raise CompressionConfigError(f"{path}: pattern {pattern!r} matches no {what} of this {model_type} model "
                                         f"(names look like: {examples}, ...)")
        chosen |= hits
    return chosen


def _module_method(model: nn.Module, method: Method, modules: dict[str, str], tied: dict[str, list[str]],
                   plan: Plan) -> None:
    kinds = KINDS[method.name]
    candidates = {n: (n,) for n, k in modules.items() if k in kinds}
    if method.name == "sparse_pruning":  # a head tied to the embedding table: the table cannot be sparse for lookups
        candidates = {n: v for n, v in candidates.items() if not any(modules[t] == "embedding" for t in tied.get(n, ()))}
    what = " or ".join(kinds) + " module"
    owner: dict[str, str] = {}
    for i, group in enumerate(method.groups):
        chosen = _selected(method, i, candidates, what, model.config.model_type)
        weights = method.name in ("weight_quantization", "post_training_quantization")
        for name in sorted(chosen):
            partners = tied.get(name, []) if weights else []  # one tensor: quantized one way for every holder
            for other in partners:
                if other not in chosen:
                    plan.notes.append(f"{other} shares its weight with {name}: {method.name} applies to both")
            for target in [name, *partners]:
                if target in owner and owner[target] != group.name:
                    raise CompressionConfigError(
                        f"compression.{method.name}: {target} is selected by groups {owner[target]!r} and "
                        f"{group.name!r}; a module belongs to one group")
                owner[target] = group.name
                p = plan.modules.setdefault(target, ModulePlan(modules[target]))
                if method.name == "weight_quantization":
                    p.scheme = group.scheme
                elif method.name == "post_training_quantization":
                    p.ptq = group.scheme
                elif method.name == "activation_quantization":
                    p.act_bits, p.act_symmetric = group.bits, method.symmetric
                else:
                    numel = model.get_submodule(target).weight.numel()
                    if round(group.dense_ratio * numel) < 1:
                        raise CompressionConfigError(
                            f"compression.sparse_pruning.different_groups.{group.name}.params.dense_ratio "
                            f"{group.dense_ratio} keeps no weight of {target} ({numel} weights)")
                    p.dense_ratio = group.dense_ratio


def _blocks(model: nn.Module, method: Method, blocks: list, size, unit_name: str) -> list[tuple]:
    chosen: dict[int, tuple] = {}
    for i, group in enumerate(method.groups):
        what = "attention block" if method.name == "head_pruning" else "MLP block"
        layers = _selected(method, i, {b.layer: b.names for b in blocks}, what, model.config.model_type)
        for layer in sorted(layers):
            block = blocks[layer]
            if layer in chosen:
                raise CompressionConfigError(f"compression.{method.name}: layer {layer} is selected by two groups; "
                                             "a layer belongs to one group")
            kept = round(group.dense_ratio * size(block))
            if kept < 1:
                lowest = 1 / size(block)
                raise CompressionConfigError(
                    f"compression.{method.name}.different_groups.{group.name}.params.dense_ratio {group.dense_ratio} "
                    f"keeps 0 of the {size(block)} {unit_name} of layer {layer}; the smallest ratio that keeps one is "
                    f"{lowest:.3g}")
            chosen[layer] = (block, kept)
    return [chosen[k] for k in sorted(chosen)]


def _tied_groups(model: nn.Module, modules: dict[str, str]) -> dict[str, list[str]]:
    """module name -> the other modules holding the same weight Parameter."""
    by_param: dict[int, list[str]] = {}
    for name in modules:
        by_param.setdefault(id(model.get_submodule(name).weight), []).append(name)
    return {n: [o for o in names if o != n] for names in by_param.values() if len(names) > 1 for n in names}
