"""Build a HuggingFace model from a preset name, a config JSON, or a local HF checkpoint folder.

Model code knows nothing of parallelism: what this returns is a plain transformers model that the
stage hands to `deepspeed.initialize`. Loading never runs code from a model folder (trust_remote_code=False,
as everywhere in the pipeline): only transformers' own architectures load.
"""
from __future__ import annotations

import json
import os

from pipeline.models.presets import DECODERS, ENCODERS, PRESETS


def check_objective(config, objective: str, spec: str) -> None:
    """Decoders pretrain with clm, encoders with mlm; anything else is a clear error."""
    if config.model_type in DECODERS:
        natural, kind = "clm", "decoder"
    elif config.model_type in ENCODERS:
        natural, kind = "mlm", "encoder"
    else:
        raise ValueError(f"--model {spec}: model type {config.model_type!r} is neither a known decoder "
                         f"({sorted(DECODERS)}) nor encoder ({sorted(ENCODERS)})")
    if natural != objective:
        raise ValueError(f"--model {spec} is a {kind} ({config.model_type}); it trains with "
                         f"--objective {natural}, not {objective}")


def load_model_config(spec: str, vocab_size: int, special_ids: dict[str, int]):
    """Resolve --model: a preset name, a config JSON file, or an HF folder with config.json.

    Returns (config, checkpoint_dir or None). Fresh configs take the tokenizer's vocabulary size;
    a checkpoint must already match it (its embeddings were trained for its own vocabulary).
    """
    from transformers import AutoConfig

    checkpoint = None
    if spec in PRESETS:
        args = dict(PRESETS[spec])
    elif os.path.isfile(spec):
        args = _read_config(spec)
    elif os.path.isfile(os.path.join(spec, "config.json")):
        checkpoint = spec
        args = _read_config(os.path.join(spec, "config.json"))
    else:
        raise ValueError(f"--model {spec!r}: not a preset ({', '.join(PRESETS)}), a config JSON file, "
                         "or a folder with config.json")

    model_type = args.pop("model_type")
    if checkpoint is None:
        given = args.get("vocab_size")
        if given is not None and given < vocab_size:
            raise ValueError(f"--model {spec}: vocab_size {given} is smaller than the tokenizer's {vocab_size}; "
                             "remove vocab_size from the config (it is taken from the tokenizer)")
        args["vocab_size"] = given or vocab_size
        args.update({k: v for k, v in special_ids.items() if v is not None and v >= 0})
        try:
            config = AutoConfig.for_model(model_type, **args)
        except Exception as e:  # transformers validates fields with its own exception types
            raise ValueError(f"--model {spec}: not a valid {model_type!r} config: {e}") from None
    else:
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=False)
        if config.vocab_size < vocab_size:
            raise ValueError(f"--model {spec}: its vocabulary has {config.vocab_size} entries but the data's "
                             f"tokenizer has {vocab_size}; prepare the data with this model's tokenizer "
                             f"(python -m pipeline.prepare --tokenizer {spec} ...)")
    return config, checkpoint


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            args = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(args, dict) or "model_type" not in args:
        raise ValueError(f"{path}: a model config needs a \"model_type\" (e.g. \"llama\", \"gpt2\", \"bert\")")
    return args


def build_model(spec: str, objective: str, vocab_size: int, special_ids: dict[str, int]):
    """A trainable model for `objective` ('clm' or 'mlm'): fresh weights from a preset/config JSON,
    or the weights of an HF checkpoint folder (continued pretraining). On a CPU without native bf16,
    its bf16 matrix products will run on fp32 kernels (pipeline/models/cpu_bf16.py: same numbers, ~5x
    faster training steps there)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from pipeline.models.cpu_bf16 import use_fp32_kernels_for_bf16

    config, checkpoint = load_model_config(spec, vocab_size, special_ids)
    check_objective(config, objective, spec)
    config.use_cache = False
    cls = AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM
    if checkpoint:
        model = cls.from_pretrained(checkpoint, config=config, attn_implementation="sdpa", dtype="float32",
                                    trust_remote_code=False)
    else:
        model = cls.from_config(config, attn_implementation="sdpa", trust_remote_code=False)
    return use_fp32_kernels_for_bf16(model)


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings allow (None when unbounded)."""
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None
