"""The `compression` block of a config: parse and check it, before any model exists.

The shape is DeepSpeed's old `compression_training` schema: each method has `shared_parameters`
(method-wide settings, `enabled` among them) and `different_groups`, named groups that each give
`params` and `modules`, a list of module-name patterns. A pattern is a Python regular expression
searched in the module's qualified name (`re.search`, as DeepSpeed did), or `"*"` for every module
the method applies to. `layer_reduction` and `knowledge_distillation` are flat objects.

    "compression": {
      "weight_quantization": {
        "shared_parameters": {"enabled": true, "schedule_offset": 0, "quantization_type": "symmetric"},
        "different_groups": {"wq1": {"params": {"target_bits": 8}, "modules": ["*"]}}
      },
      "layer_reduction": {"enabled": true, "keep_number_layer": 2, "teacher_layer": [1, 3]},
      "knowledge_distillation": {"enabled": true, "temperature": 2.0}
    }

Every unknown key, wrong type or impossible value is a `CompressionConfigError` naming its key path
(`compression.sparse_pruning.different_groups.sp1.params.dense_ratio`). Whether a pattern matches a
module, and whether a ratio leaves anything of a given model, is checked by `plan.resolve`.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any


class CompressionConfigError(ValueError):
    pass


@dataclass(frozen=True)
class QuantScheme:
    """How a weight matrix (out, in) is stored as integers: `bits` 8 or 4, one scale per output row
    (group_size 0) or per `group_size` consecutive input columns, symmetric (w = q s) or asymmetric
    (w = (q - z) s)."""
    bits: int
    group_size: int = 0
    symmetric: bool = True


@dataclass(frozen=True)
class Group:
    """One entry of `different_groups`: its name (for messages), its patterns and its settings."""
    name: str
    modules: tuple[str, ...]
    scheme: QuantScheme | None = None   # weight quantization / post-training quantization
    bits: int | None = None             # activation quantization
    dense_ratio: float | None = None    # pruning: the share of weights / heads / rows kept


@dataclass(frozen=True)
class Method:
    """A grouped method (every one but layer_reduction and knowledge_distillation)."""
    name: str
    groups: tuple[Group, ...]
    schedule_offset: int = 0          # optimizer step at which the method turns on
    schedule_offset_end: int = 0      # sparse_pruning: step at which the target density is reached
    schedule_offset_stride: int = 1   # sparse_pruning: steps between mask updates on the way there
    symmetric: bool = True            # activation quantization: symmetric int8 or asymmetric uint8
    num_heads: int | None = None      # head_pruning: the model's heads per layer, when the config states it


@dataclass(frozen=True)
class LayerReduction:
    keep_number_layer: int
    teacher_layer: tuple[int, ...]
    module_name_prefix: str | None = None


@dataclass(frozen=True)
class Distillation:
    temperature: float = 2.0
    logits_weight: float = 1.0   # KL(teacher || student) of the logits at `temperature`, times T^2
    hidden_weight: float = 0.0   # MSE of hidden states, student layer i against the teacher layer it came from
    task_weight: float = 1.0     # the task's own loss (cross-entropy on labels)


@dataclass(frozen=True)
class CompressionConfig:
    weight_quantization: Method | None = None
    activation_quantization: Method | None = None
    sparse_pruning: Method | None = None
    row_pruning: Method | None = None
    head_pruning: Method | None = None
    post_training_quantization: Method | None = None
    layer_reduction: LayerReduction | None = None
    knowledge_distillation: Distillation | None = None

    @property
    def grouped(self) -> list[Method]:
        return [m for m in (self.weight_quantization, self.activation_quantization, self.sparse_pruning,
                            self.row_pruning, self.head_pruning, self.post_training_quantization) if m is not None]

    @property
    def needs_training(self) -> list[str]:
        """The enabled methods that only make sense with training steps."""
        names = [m.name for m in self.grouped if m.name != "post_training_quantization"]
        return names + (["layer_reduction"] if self.layer_reduction else [])

    @property
    def enabled(self) -> list[str]:
        return [m.name for m in self.grouped] + [n for n in ("layer_reduction", "knowledge_distillation")
                                                 if getattr(self, n) is not None]


# Per method: the keys allowed in shared_parameters and in each group's params ("*" marks required).
GROUPED = {
    "weight_quantization": ({"enabled", "schedule_offset", "quantization_type"}, {"*target_bits", "group_size"}),
    "activation_quantization": ({"enabled", "schedule_offset", "quantization_type", "range_calibration"}, {"*bits"}),
    "sparse_pruning": ({"enabled", "schedule_offset", "schedule_offset_end", "schedule_offset_stride", "method"},
                       {"*dense_ratio"}),
    "row_pruning": ({"enabled", "schedule_offset", "method"}, {"*dense_ratio"}),
    "head_pruning": ({"enabled", "schedule_offset", "method", "num_heads"}, {"*dense_ratio"}),
    "post_training_quantization": ({"enabled", "quantization_type"}, {"*target_bits", "group_size"}),
}
FLAT = {
    "layer_reduction": {"enabled", "*keep_number_layer", "*teacher_layer", "module_name_prefix"},
    "knowledge_distillation": {"enabled", "temperature", "logits_weight", "hidden_weight", "task_weight"},
}
WEIGHT_BITS = (8, 4)
ACTIVATION_BITS = (8,)


def parse_compression(block: Any, where: str = "compression") -> CompressionConfig:
    """Check a `compression` block and return it typed. Disabled methods are checked too, then left out."""
    _object(block, where)
    _known_keys(block, set(GROUPED) | set(FLAT), set(), where)
    if not block:
        raise CompressionConfigError(f"{where} is empty: enable at least one of {', '.join(sorted({*GROUPED, *FLAT}))}")
    parsed: dict[str, Any] = {}
    for name, body in block.items():
        path = f"{where}.{name}"
        if name in GROUPED:
            parsed[name] = _grouped(name, body, path)
        elif name == "layer_reduction":
            parsed[name] = _layer_reduction(body, path)
        else:
            parsed[name] = _distillation(body, path)
    config = CompressionConfig(**{k: v for k, v in parsed.items() if v is not None})
    if not config.enabled:
        raise CompressionConfigError(f"{where}: every method has \"enabled\": false; enable at least one")
    return config


# ---------------------------------------------------------------- methods

def _grouped(name: str, body: Any, path: str) -> Method | None:
    shared_keys, param_keys = GROUPED[name]
    _object(body, path)
    _known_keys(body, {"shared_parameters", "different_groups"}, {"shared_parameters", "different_groups"}, path)
    shared = body["shared_parameters"]
    spath = f"{path}.shared_parameters"
    _object(shared, spath)
    _known_keys(shared, shared_keys, set(), spath)
    enabled = _bool(shared.get("enabled", True), f"{spath}.enabled")
    offset = _int(shared.get("schedule_offset", 0), f"{spath}.schedule_offset", minimum=0)
    kwargs: dict[str, Any] = {"schedule_offset": offset}
    # Weights default to symmetric (zero is exact, no zero points); activations to asymmetric uint8,
    # the dynamic int8 kernels' own format.
    default_type = "asymmetric" if name == "activation_quantization" else "symmetric"
    symmetric = _choice(shared.get("quantization_type", default_type), f"{spath}.quantization_type",
                        ("symmetric", "asymmetric")) == "symmetric"
    kwargs["symmetric"] = symmetric
    if "range_calibration" in shared:
        _choice(shared["range_calibration"], f"{spath}.range_calibration", ("dynamic",),
                hint="static ranges need calibration data; this project quantizes activations with the range of "
                     "each batch")
    if "method" in shared:
        _choice(shared["method"], f"{spath}.method", ("l1",),
                hint="pruning ranks weights by magnitude (l1); learned top-k scores are not implemented")
    if "num_heads" in shared:  # DeepSpeed required it; here it is read from the model and only checked
        kwargs["num_heads"] = _int(shared["num_heads"], f"{spath}.num_heads", minimum=1)
    if name == "sparse_pruning":
        end = _int(shared.get("schedule_offset_end", offset), f"{spath}.schedule_offset_end", minimum=0)
        if end < offset:
            raise CompressionConfigError(f"{spath}.schedule_offset_end {end} is before schedule_offset {offset}")
        kwargs["schedule_offset_end"] = end
        kwargs["schedule_offset_stride"] = _int(shared.get("schedule_offset_stride", 1),
                                                f"{spath}.schedule_offset_stride", minimum=1)

    groups_path = f"{path}.different_groups"
    groups_body = body["different_groups"]
    _object(groups_body, groups_path)
    if not groups_body:
        raise CompressionConfigError(f"{groups_path} is empty: give at least one group with \"params\" and \"modules\"")
    groups = []
    for gname, gbody in groups_body.items():
        gpath = f"{groups_path}.{gname}"
        _object(gbody, gpath)
        _known_keys(gbody, {"params", "modules"}, {"params", "modules"}, gpath)
        params = gbody["params"]
        ppath = f"{gpath}.params"
        _object(params, ppath)
        _known_keys(params, {k.lstrip("*") for k in param_keys}, {k[1:] for k in param_keys if k[0] == "*"}, ppath)
        modules = _patterns(gbody["modules"], f"{gpath}.modules")
        group: dict[str, Any] = {"name": gname, "modules": modules}
        if "target_bits" in params:
            bits = _int(params["target_bits"], f"{ppath}.target_bits")
            if bits not in WEIGHT_BITS:
                raise CompressionConfigError(f"{ppath}.target_bits must be 8 or 4, got {bits}")
            group_size = _int(params.get("group_size", 0), f"{ppath}.group_size", minimum=0)
            group["scheme"] = QuantScheme(bits, group_size, symmetric)
        if "bits" in params:
            bits = _int(params["bits"], f"{ppath}.bits")
            if bits not in ACTIVATION_BITS:
                raise CompressionConfigError(f"{ppath}.bits must be 8 (dynamic int8 activations), got {bits}")
            group["bits"] = bits
        if "dense_ratio" in params:
            ratio = params["dense_ratio"]
            if not _is_number(ratio) or not 0 < ratio <= 1:
                raise CompressionConfigError(f"{ppath}.dense_ratio must be in (0, 1] (the share kept), got {ratio!r}")
            group["dense_ratio"] = float(ratio)
        groups.append(Group(**group))
    return Method(name=name, groups=tuple(groups), **kwargs) if enabled else None


def _layer_reduction(body: Any, path: str) -> LayerReduction | None:
    _object(body, path)
    keys = FLAT["layer_reduction"]
    _known_keys(body, {k.lstrip("*") for k in keys}, {k[1:] for k in keys if k[0] == "*"}, path)
    enabled = _bool(body.get("enabled", True), f"{path}.enabled")
    keep = _int(body["keep_number_layer"], f"{path}.keep_number_layer", minimum=1)
    layers = body["teacher_layer"]
    if not isinstance(layers, list) or not all(_is_int(i) and i >= 0 for i in layers):
        raise CompressionConfigError(f"{path}.teacher_layer must be a list of layer indices (0-based), got {layers!r}")
    if len(layers) != keep:
        raise CompressionConfigError(f"{path}.teacher_layer has {len(layers)} entries but keep_number_layer is {keep}")
    if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
        raise CompressionConfigError(f"{path}.teacher_layer must be increasing without repeats, got {layers}")
    prefix = body.get("module_name_prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise CompressionConfigError(f"{path}.module_name_prefix must be a string, got {prefix!r}")
    return LayerReduction(keep, tuple(layers), prefix) if enabled else None


def _distillation(body: Any, path: str) -> Distillation | None:
    _object(body, path)
    _known_keys(body, FLAT["knowledge_distillation"], set(), path)
    enabled = _bool(body.get("enabled", True), f"{path}.enabled")
    values = {}
    for key, default in (("temperature", 2.0), ("logits_weight", 1.0), ("hidden_weight", 0.0), ("task_weight", 1.0)):
        value = body.get(key, default)
        if not _is_number(value) or value < 0 or (key == "temperature" and value == 0):
            raise CompressionConfigError(f"{path}.{key} must be a {'positive' if key == 'temperature' else 'non-negative'} "
                                         f"number, got {value!r}")
        values[key] = float(value)
    if values["logits_weight"] + values["hidden_weight"] + values["task_weight"] == 0:
        raise CompressionConfigError(f"{path}: logits_weight, hidden_weight and task_weight are all 0; nothing to train on")
    return Distillation(**values) if enabled else None


# ---------------------------------------------------------------- small checks

def _known_keys(obj: dict, allowed: set[str], required: set[str], path: str) -> None:
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CompressionConfigError(f"{path}: unknown key {key!r}{hint} (known: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(obj))
    if missing:
        raise CompressionConfigError(f"{path}: missing {', '.join(repr(m) for m in missing)}")


def _patterns(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) and p for p in value):
        raise CompressionConfigError(f"{path} must be a non-empty list of module-name patterns, got {value!r}")
    for pattern in value:
        if pattern != "*":
            try:
                re.compile(pattern)
            except re.error as e:
                raise CompressionConfigError(f"{path}: {pattern!r} is not a valid regular expression ({e})") from None
    return tuple(value)


def _object(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        raise CompressionConfigError(f"{path} must be a JSON object, got {value!r}")


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise CompressionConfigError(f"{path} must be true or false, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value: Any, path: str, minimum: int | None = None) -> int:
    if not _is_int(value) or (minimum is not None and value < minimum):
        rule = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise CompressionConfigError(f"{path} must be {rule}, got {value!r}")
    return value


def _choice(value: Any, path: str, choices: tuple[str, ...], hint: str = "") -> str:
    if value not in choices:
        raise CompressionConfigError(f"{path} must be {' or '.join(repr(c) for c in choices)}, got {value!r}"
                                     + (f" ({hint})" if hint else ""))
    return value
