"""DeepSpeed JSON: load, fill "auto", check the batch arithmetic, adapt to the device.

Every stage reads its DeepSpeed config through this module, before any process group starts:

    cfg = load_ds_config(args.deepspeed_config)
    cfg, warnings = resolve_ds_config(cfg, world_size=W, train_steps=N, output_dir=RUN, accelerator="cpu")
    for w in warnings: print(w)          # once, on rank 0
    deepspeed.initialize(..., config=cfg)  # and write cfg to RUN/ds_config.json

No function starts a process group or writes a file, so `python -m pipeline.pretrain --dry-run` and
the unit tests can use them anywhere. `resolve_ds_config` ends by handing the result to DeepSpeed's
own parser (`DeepSpeedConfig`) and building its LR scheduler on a toy optimizer, as
`deepspeed.initialize` will: a config DeepSpeed rejects (an unknown key under zero_optimization, a
scheduler argument it does not take) is an error "JSON: DeepSpeed rejects it: ..." before the run
folder is written.

The shipped ds_configs/*.json are valid for plain DeepSpeed as they stand: no "auto" in them, no
train_batch_size (DeepSpeed derives it, and so does `resolve_batch`: a missing key is derived, like
"auto"). "auto" is still accepted in a user's JSON (as the HuggingFace integration does); DeepSpeed
fills none outside the HuggingFace Trainer, so each is filled here or is an error:

    train_batch_size                micro x accumulation x data-parallel size
    train_micro_batch_size_per_gpu  train_batch_size // (accumulation x dp) when the train batch is
                                    given, else 1
    gradient_accumulation_steps     train_batch_size // (micro x dp) when both are given, else 1
    scheduler.params.total_num_steps    the stage's --train-steps
    scheduler.params.warmup_num_steps   max(1, total_num_steps // 20): 5% of the schedule
    tensorboard.output_path         RUN/tensorboard (job_name is set to "" so that the events land
                                    in that folder itself, not in a job-named subfolder)
    pipeline.stages                 1
    anything else                   an error naming the key path

The LR schedule and --train-steps: the scheduler's numbers mean what they mean to DeepSpeed. A
concrete total_num_steps is the schedule's length and --train-steps is where the run stops; when the
two differ, one line says so (a run stopped before the schedule ends continues on the same schedule
when rerun with a larger --train-steps, so it resumes exactly). "auto" fits the schedule to the run.

Data-parallel size = world_size // pipeline stages; a world size that the stages do not divide is
an error. train = micro x accumulation x dp must hold exactly: a contradiction is an error naming
every value, e.g. "train_batch_size 32 != train_micro_batch_size_per_gpu 4 x
gradient_accumulation_steps 2 x data-parallel size 2 = 16".

TensorBoard is always enabled and always points at RUN/tensorboard, because every run records its
metrics there. The shipped files say "output_path": "tensorboard" (plain DeepSpeed writes to
./tensorboard; relative to the run folder it is RUN/tensorboard); another output_path is replaced,
with a warning.

The `activation_checkpointing` block turns activation recomputation on (HuggingFace gradient
checkpointing in a plain run). DeepSpeed applies its options (partition_activations,
cpu_checkpointing, ...) only to models that call deepspeed.checkpointing themselves, which these do
not: options that are set get one warning naming them.

Adaptations on the CPU accelerator (accelerator == "cpu"), read from deepspeed 0.19.8's source:
- fp16 -> bf16, with one warning. `DeepSpeedEngine._do_sanity_check` raises "Type fp16 is not
  supported on your device" unless oneDNN has fp16 (AVX512-FP16/AMX-FP16, absent on most CPUs);
  bf16 always works there. The switch is unconditional on CPU so that one config behaves the same
  on every laptop, and `precision_of(resolved)` reports the precision actually used.
- Adam/AdamW get `"torch_adam": true` unless the config sets torch_adam itself. Otherwise DeepSpeed
  builds its FusedAdam (or DeepSpeedCPUAdam under ZeRO offload) as a C++ op JIT-compiled on first
  use: about 3 minutes on 2 cores for each op on a cold cache, with every rank waiting on it.
  torch.optim.AdamW is the same algorithm and works with ZeRO 0-3 and with offload. It also gets
  `"fused": true` (unless the config sets fused or foreach): torch's single-kernel CPU AdamW, the same
  numbers as its default per-tensor loop and 3-5x faster on a 1M-8M element fp32 partition (one thread,
  the AMX CPU), which matters most at larger models, where the step is memory-bound.

Pipeline parallelism: DeepSpeed's PipelineEngine asserts ZeRO stage < 2, so a config with a
`pipeline` block and ZeRO-2/3 is rejected here, before anything starts.

Compression: the `compression` block (ds_configs/compression/) is this project's, not DeepSpeed's;
`split_compression` sets it aside for pipeline.compress, and `resolve_ds_config` refuses a config
that still holds it (DeepSpeed would ignore it silently and train uncompressed).
"""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

AUTO = "auto"

# Share of the LR schedule spent warming up when warmup_num_steps is "auto".
WARMUP_FRACTION_DENOMINATOR = 20

BF16_EMULATED_ON_CPU_WARNING = (
    "this CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 matrix products are emulated and run about 30x "
    "slower than fp32 here. The run keeps the config's bf16; for fast CPU debugging set \"bf16\": "
    "{\"enabled\": false} (fp32)."
)

FP16_ON_CPU_WARNING = (
    "fp16 requested, but DeepSpeed refuses fp16 on CPU ('Type fp16 is not supported on your device'): "
    "this run uses bf16 instead (the fp16 loss-scaling settings do not apply)."
)


def load_ds_config(path: str) -> dict:
    """Read a DeepSpeed JSON config. Errors name the file (and line:column for bad JSON)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        cfg = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except _DuplicateKey as e:
        # DeepSpeed rejects duplicate keys too; json would silently keep the last one.
        raise ValueError(f"{path}: duplicate key {e.args[0]!r} in the DeepSpeed config") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a DeepSpeed config is a JSON object, got {type(cfg).__name__}")
    if "compression_training" in cfg:
        raise ValueError(
            f"{path}: 'compression_training' belongs to DeepSpeed's compression library, which DeepSpeed 0.19 "
            "removed (the block would be ignored and the model would train uncompressed). Use a config from "
            "ds_configs/compression/, whose 'compression' block pipeline.compress applies.")
    return cfg


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def resolve_batch(train: int | str | None, micro: int | str | None, accum: int | str | None,
                  dp_size: int) -> tuple[int, int, int]:
    """Fill and check train = micro x accum x dp; returns (train, micro, accum).

    None or "auto" means "derive it": from the other two when they are known, else micro 1 and
    accum 1. Every contradiction or remainder is a ValueError that names the values involved.
    """
    if not _is_int(dp_size) or dp_size < 1:
        raise ValueError(f"data-parallel size must be a positive integer, got {dp_size!r}")
    train = _batch_value("train_batch_size", train)
    micro = _batch_value("train_micro_batch_size_per_gpu", micro)
    accum = _batch_value("gradient_accumulation_steps", accum)

    if train is None:
        micro = 1 if micro is None else micro
        accum = 1 if accum is None else accum
        return micro * accum * dp_size, micro, accum

    if micro is None and accum is None:
        accum = 1  # one micro-batch per step unless asked otherwise: the largest micro-batch
    if micro is None:
        per_step = accum * dp_size
        if train % per_step:
            raise ValueError(f"train_batch_size {train} is not a multiple of gradient_accumulation_steps {accum} "
                             f"x data-parallel size {dp_size} = {per_step}")
        return train, train // per_step, accum
    if accum is None:
        per_step = micro * dp_size
        if train % per_step:
            raise ValueError(f"train_batch_size {train} is not a multiple of train_micro_batch_size_per_gpu {micro} "
                             f"x data-parallel size {dp_size} = {per_step}")
        return train, micro, train // per_step

    if train != micro * accum * dp_size:
        raise ValueError(f"train_batch_size {train} != train_micro_batch_size_per_gpu {micro} x "
                         f"gradient_accumulation_steps {accum} x data-parallel size {dp_size} = "
                         f"{micro * accum * dp_size}")
    return train, micro, accum


def _batch_value(name: str, value: int | str | None) -> int | None:
    if value is None or value == AUTO:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer or \"auto\", got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_ds_config(cfg: dict, *, world_size: int, train_steps: int, output_dir: str,
                      accelerator: str, source: str | None = None) -> tuple[dict, list[str]]:
    """Return (a new config with every "auto" filled and adapted to the accelerator, warnings).

    The input is not modified. The warnings are for the user, to print once (rank 0).
    See the module docstring for the rules. `source` (the JSON's path) starts every error message.
    """
    try:
        return _resolve(cfg, world_size=world_size, train_steps=train_steps, output_dir=output_dir,
                        accelerator=accelerator)
    except ValueError as e:
        if source is None:
            raise
        raise ValueError(f"{source}: {e}") from None


def _resolve(cfg: dict, *, world_size: int, train_steps: int, output_dir: str,
             accelerator: str) -> tuple[dict, list[str]]:
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world size must be a positive integer, got {world_size!r}")
    if not _is_int(train_steps) or train_steps < 1:
        raise ValueError(f"train steps must be a positive integer, got {train_steps!r}")
    if "compression" in cfg:
        raise ValueError("this config has a 'compression' block, which only pipeline.compress applies "
                         "(DeepSpeed would ignore it); set it aside with split_compression() first")
    precision_of(cfg)  # fp16 and bf16 both enabled is an error: better now than inside deepspeed.initialize
    cfg = copy.deepcopy(cfg)
    warnings: list[str] = []

    # Parallel layout: pipeline stages split the world; the rest is data parallel.
    stages = pipeline_stages_of(cfg)
    if "pipeline" in cfg:
        cfg["pipeline"]["stages"] = stages
        zero = zero_stage_of(cfg)
        if zero >= 2:
            raise ValueError(
                f"ZeRO stage {zero} with a 'pipeline' block: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 "
                "only (ZeRO-2/3 partition gradients/parameters, which the pipeline schedule does not handle). "
                "Use ZeRO-1 with pipelining (ds_configs/pipe2.json), or drop the 'pipeline' block to use ZeRO-2/3.")
        _check_pipeline_block(cfg["pipeline"])
    if world_size % stages:
        raise ValueError(f"world size {world_size} is not a multiple of pipeline.stages {stages}")
    dp_size = world_size // stages

    try:
        train, micro, accum = resolve_batch(cfg.get("train_batch_size"), cfg.get("train_micro_batch_size_per_gpu"),
                                            cfg.get("gradient_accumulation_steps"), dp_size)
    except ValueError as e:
        raise ValueError(f"{e} (data-parallel size {dp_size} = world size {world_size} // pipeline stages "
                         f"{stages})") from None
    cfg["train_batch_size"] = train
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum

    _resolve_scheduler(cfg, train_steps, warnings)
    _resolve_tensorboard(cfg, output_dir, warnings)
    _warn_ignored_activation_checkpointing(cfg, warnings)

    if accelerator == "cpu":
        _adapt_to_cpu(cfg, warnings)

    leftover = _auto_paths(cfg)
    if leftover:
        raise ValueError(f"\"auto\" has no meaning here for: {', '.join(leftover)} (see ds_configs/README.md "
                         "for the keys that accept \"auto\"); give a value")
    _check_with_deepspeed(cfg)
    return cfg, warnings


def _check_pipeline_block(block: dict) -> None:
    """The pipeline keys this project reads (pipeline/models/pipe.py), checked before anything starts."""
    partition = block.get("partition", "parameters")
    if not isinstance(partition, str) or not (partition.lower() in ("parameters", "uniform")
                                              or partition.lower().startswith("type:")):
        raise ValueError(f"pipeline.partition must be \"parameters\", \"uniform\" or \"type:REGEX\" (a layer class "
                         f"name pattern, e.g. \"type:DecoderLayer\"), got {partition!r}")
    if partition.lower().startswith("type:"):
        try:
            re.compile(partition.split(":", 1)[1])
        except re.error as e:
            raise ValueError(f"pipeline.partition {partition!r}: not a valid regular expression ({e})") from None
    interval = block.get("activation_checkpoint_interval", 0)
    if not _is_int(interval) or interval < 0:
        raise ValueError(f"pipeline.activation_checkpoint_interval must be 0 (off) or a positive number of layers, "
                         f"got {interval!r}")
    if not isinstance(block.get("use_reentrant", False), bool):
        raise ValueError(f"pipeline.use_reentrant must be true or false, got {block['use_reentrant']!r}")


def _resolve_scheduler(cfg: dict, train_steps: int, warnings: list[str]) -> None:
    """Fill "auto" step counts from the run's steps. A concrete total_num_steps is the schedule's length, as
    for DeepSpeed: kept, with one line when the run is shorter or longer than the schedule."""
    params = _block(cfg, "scheduler").get("params")
    if not params:
        return
    if params.get("total_num_steps") == AUTO:
        params["total_num_steps"] = train_steps
    total = params.get("total_num_steps")
    if params.get("warmup_num_steps") == AUTO:
        # WarmupLR has no total: its warmup follows the run's length.
        base = train_steps if total is None else total
        if not _is_int(base) or base < 1:
            raise ValueError(f"scheduler.params.total_num_steps must be a positive integer, got {base!r}")
        params["warmup_num_steps"] = max(1, base // WARMUP_FRACTION_DENOMINATOR)
    if _is_int(total) and total != train_steps:
        where = (f"stops at step {train_steps} of it" if train_steps < total
                 else f"trains {train_steps - total} steps past its end")
        warnings.append(f"the LR schedule is {total} steps long (scheduler.params.total_num_steps) and this run "
                        f"trains {train_steps}: it {where}. The JSON's schedule is kept, so a run stopped early "
                        "resumes on it; \"total_num_steps\": \"auto\" fits the schedule to the run")


def _resolve_tensorboard(cfg: dict, output_dir: str, warnings: list[str]) -> None:
    wanted = os.path.join(output_dir, "tensorboard")
    tb = cfg.setdefault("tensorboard", {})
    if tb.get("enabled", True) is not True:
        warnings.append(f"tensorboard.enabled {tb['enabled']!r} ignored: every run writes TensorBoard events to {wanted}")
    path = tb.get("output_path", AUTO)
    # "tensorboard", as shipped, is RUN/tensorboard relative to the run folder (plain DeepSpeed: ./tensorboard).
    if path not in (AUTO, "") and os.path.normpath(os.path.join(output_dir, str(path))) != os.path.normpath(wanted):
        warnings.append(f"tensorboard.output_path {path!r} replaced by {wanted}: the run folder holds its events")
    if tb.get("job_name", "") not in ("", AUTO):
        warnings.append(f"tensorboard.job_name {tb['job_name']!r} ignored: events go to {wanted} itself")
    tb.update(enabled=True, output_path=wanted, job_name="")


# DeepSpeed's activation-checkpointing options (deepspeed/runtime/activation_checkpointing/config.py).
ACTIVATION_CHECKPOINTING_OPTIONS = ("partition_activations", "contiguous_memory_optimization", "cpu_checkpointing",
                                    "number_checkpoints", "synchronize_checkpoint_boundary", "profile")


def _warn_ignored_activation_checkpointing(cfg: dict, warnings: list[str]) -> None:
    """DeepSpeed reads these options only through deepspeed.checkpointing.configure(), for models that call its
    checkpoint function themselves; here the block only turns recomputation on, so set options do nothing."""
    block = _block(cfg, "activation_checkpointing")
    ignored = [key for key in ACTIVATION_CHECKPOINTING_OPTIONS if block.get(key) not in (None, False)]
    if ignored:
        warnings.append(f"activation_checkpointing: {', '.join(ignored)} ignored. The block only turns activation "
                        "recomputation on (HuggingFace gradient checkpointing of every decoder layer; for a pipeline, "
                        "pipeline.activation_checkpoint_interval); DeepSpeed applies these options only to models that "
                        "call deepspeed.checkpointing themselves")


def _check_with_deepspeed(cfg: dict) -> None:
    """Parse the resolved config with DeepSpeed's own parser and build its LR scheduler on a toy optimizer, as
    deepspeed.initialize will, so that a config DeepSpeed rejects fails now, with DeepSpeed's reason.

    Without a process group DeepSpeedConfig takes the world size as 1 and checks train = micro x accum x 1; the
    batch arithmetic was checked above with the real data-parallel size, so the train batch is left out here
    and DeepSpeed derives it."""
    import torch
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        ds = DeepSpeedConfig({k: v for k, v in cfg.items() if k != "train_batch_size"})
        if ds.scheduler_name is not None:
            # deepspeed.runtime.engine.DeepSpeedEngine._scheduler_from_config, on a one-parameter optimizer.
            scheduler = getattr(lr_schedules, ds.scheduler_name, None) or getattr(torch.optim.lr_scheduler,
                                                                                 ds.scheduler_name, None)
            if scheduler is None:
                raise ValueError(f"scheduler.type {ds.scheduler_name!r} is neither a DeepSpeed LR schedule nor in "
                                 "torch.optim.lr_scheduler")
            toy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
            scheduler(toy, **(ds.scheduler_params or {}))
    except (ValueError, TypeError, AssertionError, KeyError) as e:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"DeepSpeed rejects it: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    """One line for an error: pydantic's first error as `Model: key.path: message`, else the message's first line."""
    errors = getattr(error, "errors", None)
    if callable(errors) and getattr(error, "title", None):
        first = errors()[0]
        return f"{error.title}: {'.'.join(str(k) for k in first['loc'])}: {first['msg']}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX). Unknown counts as yes."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (ImportError, AttributeError, RuntimeError):
        return True


def _adapt_to_cpu(cfg: dict, warnings: list[str]) -> None:
    if _enabled(cfg, "fp16"):
        del cfg["fp16"]
        cfg.pop("bfloat16", None)  # the legacy spelling; "bf16" below is the one that counts
        cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": True}
        warnings.append(FP16_ON_CPU_WARNING)
    if _enabled(cfg, "bf16") and not cpu_has_native_bf16():
        warnings.append(BF16_EMULATED_ON_CPU_WARNING)

    optimizer = cfg.get("optimizer")
    if optimizer and str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        params = optimizer.setdefault("params", {})
        if "torch_adam" not in params:
            params["torch_adam"] = True  # avoids the JIT-compiled FusedAdam / DeepSpeedCPUAdam op
            if "foreach" not in params:
                params.setdefault("fused", True)  # torch's one-kernel CPU AdamW: 3-5x the per-tensor loop


def _auto_paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every value still "auto" (list items as key[i])."""
    if node == AUTO:
        return [prefix or "<root>"]
    if isinstance(node, dict):
        items = ((f"{prefix}.{k}" if prefix else str(k), v) for k, v in node.items())
    elif isinstance(node, list):
        items = ((f"{prefix}[{i}]", v) for i, v in enumerate(node))
    else:
        return []
    return [path for key, value in items for path in _auto_paths(value, key)]


def precision_of(cfg: dict) -> str:
    """"bf16", "fp16" or "fp32": the precision DeepSpeed trains in with this (resolved) config."""
    fp16 = _enabled(cfg, "fp16")
    bf16 = _enabled(cfg, "bf16") if "bf16" in cfg else _enabled(cfg, "bfloat16")  # DeepSpeed's own precedence
    if fp16 and bf16:
        raise ValueError("fp16.enabled and bf16.enabled are both true; choose one")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def _enabled(cfg: dict, key: str) -> bool:
    enabled = _block(cfg, key).get("enabled", False)
    if not isinstance(enabled, bool):
        raise ValueError(f"{key}.enabled must be true or false, got {enabled!r}")
    return enabled


def zero_stage_of(cfg: dict) -> int:
    """ZeRO stage 0-3 (0 when there is no zero_optimization block)."""
    stage = _block(cfg, "zero_optimization").get("stage", 0)
    if not _is_int(stage) or not 0 <= stage <= 3:
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def pipeline_stages_of(cfg: dict) -> int:
    """Pipeline stages: pipeline.stages, 1 without a pipeline block or when it is "auto"."""
    stages = _block(cfg, "pipeline").get("stages", AUTO)
    if stages == AUTO:
        return 1
    if not _is_int(stages) or stages < 1:
        raise ValueError(f"pipeline.stages must be a positive integer or \"auto\", got {stages!r}")
    return stages


def _block(cfg: dict, key: str) -> dict:
    """cfg[key], an object, or {} when absent."""
    block = cfg.get(key, {})
    if not isinstance(block, dict):
        raise ValueError(f"{key} must be a JSON object, got {block!r}")
    return block


def split_compression(cfg: dict) -> tuple[dict, dict | None]:
    """(a copy of cfg without its `compression` block, that block or None)."""
    rest = copy.deepcopy(cfg)
    return rest, rest.pop("compression", None)
