"""The compressed model format: integer weights with their scales, on disk and back.

    from pipeline.compression import load_compressed
    model = load_compressed("RUN/compressed")          # a working transformers model, in eval mode

A folder holds `config.json` (the HF config), `compression.json` (what each compressed module is),
`model.int.safetensors` (the tensors) and the tokenizer. Per compressed module `NAME`:

| tensor | what |
|---|---|
| `NAME.values` | quantized: codes as bytes, (out, in) at 8 bits, packed two per byte at 4 bits; else float32 |
| `NAME.scale`, `NAME.zero` | float32 scales and uint8 zero points (asymmetric only), (out, groups) |
| `NAME.mask` | sparse modules only: 1 bit per weight (packed 8 per byte); `values` then holds the kept ones |
| `NAME.bias` | float32 |

Every other tensor of the model (norms, unquantized weights) is stored as float32 under its own
name. A module whose weight is another's (a tied output head) is stored once (`tied_to`). Module
shapes come from compression.json, so cuts the HF config cannot describe (BERT heads) load too.

`load_compressed(path, runtime="auto")` rebuilds the model from its class and config, puts a
`QuantLinear` / `QuantEmbedding` (pipeline/compression/runtime.py) in place of each quantized module
and loads the rest; `runtime="float"` gives the exact numbers training used, "int8" the fast CPU
kernel ("auto": int8 where PyTorch has it).
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import torch
from torch import nn

from pipeline.compression.arch import kind_of, out_in
from pipeline.compression.plan import ModulePlan
from pipeline.compression.quant import pack_bits, pack_nibbles, quantize, unpack_bits, unpack_nibbles
from pipeline.compression.rebuild import construct, reshape_modules
from pipeline.compression.runtime import QuantEmbedding, QuantLinear, resolve_runtime
from pipeline.compression.schema import QuantScheme

FORMAT = "ds-pipeline-compressed"
VERSION = 1
WEIGHTS = "model.int.safetensors"
META = "compression.json"


def save_compressed(model: nn.Module, storage: dict[str, ModulePlan], path: str, tokenizer=None,
                    extra: dict | None = None) -> None:
    """Write `model` (a plain float model, cuts made) with the modules of `storage` encoded."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    owner: dict[int, str] = {}  # id(weight Parameter) -> the module stored with it
    covered: set[str] = set()
    first: dict[tuple, str] = {}  # a stored tensor's memory -> its key: a tensor seen again is an alias
    with torch.no_grad():
        for name, p in storage.items():
            module = model.get_submodule(name)
            kind = kind_of(module)
            weight = out_in(module.weight.detach().float(), kind)
            scheme = p.storage_scheme
            info = {"kind": kind, "shape": list(weight.shape), "bits": scheme.bits if scheme else None,
                    "group_size": scheme.group_size if scheme else None,
                    "symmetric": scheme.symmetric if scheme else None,
                    "activation_bits": p.act_bits, "activation_symmetric": p.act_symmetric,
                    "sparse": p.dense_ratio is not None, "bias": getattr(module, "bias", None) is not None,
                    "padding_idx": getattr(module, "padding_idx", None), "tied_to": owner.get(id(module.weight))}
            covered |= {f"{name}.weight", f"{name}.bias"}
            if info["bias"]:
                tensors[f"{name}.bias"] = module.bias.detach().float().contiguous()
                # BERT's MLM head ties `cls.predictions.bias` to its decoder's bias: that key becomes an alias
                first[_memory(tensors[f"{name}.bias"])] = f"{name}.bias"
            modules[name] = info
            if info["tied_to"]:
                continue
            owner[id(module.weight)] = name
            tensors.update(_encode(name, weight, scheme, info["sparse"]))
            info["nonzero"] = int((weight != 0).sum())

        aliases: dict[str, str] = {}
        for key, value in model.state_dict().items():
            if key in covered:
                continue
            ident = _memory(value)
            if ident in first:
                aliases[key] = first[ident]
                continue
            first[ident] = key
            tensors[key] = value.detach().float().contiguous()

    meta = {"format": FORMAT, "version": VERSION, "architecture": type(model).__name__, "modules": modules,
            "aliases": aliases, **(extra or {})}
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    config = copy.deepcopy(model.config)
    config.use_cache = True  # training turns it off; generation wants it
    config.save_pretrained(tmp)
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
    with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    if tokenizer is not None:
        (tokenizer.save_hf if hasattr(tokenizer, "save_hf") else tokenizer.save_pretrained)(tmp)
    from pipeline.files import publish_folder

    publish_folder(tmp, path)


def _memory(t: torch.Tensor) -> tuple:
    """Where a tensor's values live: equal for tensors that share them (tied weights)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def _encode(name: str, weight: torch.Tensor, scheme: QuantScheme | None, sparse: bool) -> dict[str, torch.Tensor]:
    out = {}
    if scheme is not None:
        values, scale, zero = quantize(weight, scheme)
        out[f"{name}.scale"] = scale.contiguous()
        if zero is not None:
            out[f"{name}.zero"] = zero.contiguous()
    else:
        values = weight
    if sparse:
        mask = weight != 0
        out[f"{name}.mask"] = pack_bits(mask)
        values = values[mask]
    if scheme is not None and scheme.bits == 4:
        values = pack_nibbles(values)
    out[f"{name}.values"] = values.contiguous()
    return out


def _decode(name: str, info: dict, tensors: dict[str, torch.Tensor]) -> tuple:
    """(values (out, in): uint8 codes or float32, scale, zero, scheme or None)."""
    rows, cols = info["shape"]
    scheme = QuantScheme(info["bits"], info["group_size"], info["symmetric"]) if info["bits"] else None
    scale, zero = tensors.get(f"{name}.scale"), tensors.get(f"{name}.zero")
    stored = tensors[f"{name}.values"]
    if info["sparse"]:
        mask = unpack_bits(tensors[f"{name}.mask"], rows * cols).reshape(rows, cols)
        count = int(mask.sum())
        kept = unpack_nibbles(stored, count) if scheme and scheme.bits == 4 else stored.reshape(-1)
        if scheme is None:
            values = torch.zeros(rows, cols)
        elif zero is None:
            values = torch.full((rows, cols), 2 ** (scheme.bits - 1), dtype=torch.uint8)  # the code of 0
        else:
            size = scheme.group_size or cols
            values = zero.repeat_interleave(size, dim=1)[:, :cols].clone()
        values[mask] = kept
    elif scheme and scheme.bits == 4:
        values = unpack_nibbles(stored, rows * cols).reshape(rows, cols)
    else:
        values = stored.reshape(rows, cols)
    return values, scale, zero, scheme


def load_compressed(path: str, runtime: str = "auto") -> nn.Module:
    """The model saved by `save_compressed` (pipeline.compress writes RUN/compressed), ready for inference."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from pipeline.compression.quant import dequantize

    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path}: no {META}; not a compressed model folder (pipeline.compress writes RUN/compressed)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; this code reads "
                         f"{FORMAT!r} version {VERSION}")
    runtime = resolve_runtime(runtime)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    tensors = load_file(os.path.join(path, WEIGHTS))
    model = construct(meta["architecture"], config)
    state = {k: v for k, v in tensors.items() if not any(k.startswith(f"{n}.") for n in meta["modules"])}
    state.update({k: state[v] if v in state else tensors[v] for k, v in meta["aliases"].items()})  # v: a bias too

    decoded: dict[str, tuple] = {}
    for name, info in meta["modules"].items():
        source = info["tied_to"] or name
        if source not in decoded:
            decoded[source] = _decode(source, meta["modules"][source], tensors)
        values, scale, zero, scheme = decoded[source]
        bias = tensors.get(f"{name}.bias")
        if scheme is None:  # sparse only: a plain float module
            state[f"{name}.weight"] = values.t().contiguous() if info["kind"] == "conv1d" else values
            if bias is not None:
                state[f"{name}.bias"] = bias
            continue
        if info["kind"] == "embedding":
            new = QuantEmbedding(values, scale, zero, scheme, info["padding_idx"])
        else:
            new = QuantLinear(dequantize(values, scale, zero, scheme), bias, runtime, info["activation_bits"],
                              info["activation_symmetric"])
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    reshape_modules(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the stored tensors do not fit {meta['architecture']} with this config "
                         f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    return model.eval()


def weight_bytes(path: str) -> int:
    """Bytes of the weight files of a model folder (HF safetensors/bin shards or the compressed file)."""
    names = [n for n in os.listdir(path) if n.endswith((".safetensors", ".bin")) and "tokenizer" not in n]
    return sum(os.path.getsize(os.path.join(path, n)) for n in names)
