"""Model compression in plain PyTorch: quantization-aware training, pruning, layer reduction with
distillation, post-training quantization, and the compressed format that makes them real on disk.

DeepSpeed 0.19 removed its compression library; this package reads the same kind of config (a
`compression` block: method -> shared_parameters + different_groups of module-name patterns, see
schema.py) and implements each method here:

    from pipeline.compression import parse_compression, prepare, clean, save_compressed, load_compressed
    config = parse_compression(block)                  # checks keys and values (CompressionConfigError)
    compressor = prepare(model, config)                # in place: layer reduction, wrappers; checks patterns
    ... train, calling compressor.update(step) before each forward (CompressionTask does it) ...
    cleaned = clean(model, compressor)                 # masks and quantization baked in, cuts made
    cleaned.hf_model.save_pretrained("RUN/hf")         # loads with plain transformers
    save_compressed(cleaned.model, cleaned.storage, "RUN/compressed")
    model = load_compressed("RUN/compressed")          # integer weights, fast CPU kernels

One module per idea: schema (config), arch (where layers/heads/MLPs are), plan (patterns -> modules),
quant (integer math), modules (training wrappers), compressor (schedules), distill (KD loss),
task (the training-loop task), rebuild / clean (the cut, plain model), runtime / storage (inference
modules and the on-disk format).
"""
from __future__ import annotations

from torch import nn

from pipeline.compression.arch import reduce_layers
from pipeline.compression.clean import Cleaned, clean
from pipeline.compression.compressor import Compressor
from pipeline.compression.plan import Plan, resolve
from pipeline.compression.schema import CompressionConfig, CompressionConfigError, QuantScheme, parse_compression
from pipeline.compression.storage import load_compressed, save_compressed, weight_bytes
from pipeline.compression.task import CompressionTask


def prepare(model: nn.Module, config: CompressionConfig) -> Compressor:
    """Make `model` the student, in place: keep the layers of layer_reduction, then install the
    training wrappers of every method. A pattern that selects nothing, or a ratio that keeps nothing,
    is a CompressionConfigError. Copy the model first if it is also the teacher."""
    if config.layer_reduction is not None:
        lr = config.layer_reduction
        reduce_layers(model, list(lr.teacher_layer), lr.module_name_prefix)
    return Compressor(model, config, resolve(model, config))


__all__ = ["Cleaned", "CompressionConfig", "CompressionConfigError", "CompressionTask", "Compressor", "Plan",
           "QuantScheme", "clean", "load_compressed", "parse_compression", "prepare", "resolve", "save_compressed",
           "weight_bytes"]
