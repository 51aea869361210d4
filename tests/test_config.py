"""pipeline.config: batch arithmetic, "auto" filling, CPU adaptation, and every shipped DeepSpeed JSON
accepted by DeepSpeed's own config parser."""
import glob
import json
import os

import pytest

from pipeline.config import (
    FP16_ON_CPU_WARNING,
    load_ds_config,
    pipeline_stages_of,
    precision_of,
    resolve_batch,
    resolve_ds_config,
    split_compression,
    zero_stage_of,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Top level only: ds_configs/compression/ is tested with pipeline.compress.
SHIPPED = sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json")))
DESIGN_NAMES = {f"{zero}{suffix}.json" for zero in ("zero0", "zero1", "zero2", "zero3", "zero2_offload",
                                                   "zero3_offload") for suffix in ("", "_fp16")} | {"pipe2.json"}


@pytest.fixture(autouse=True)
def native_bf16_cpu(monkeypatch):
    """Most tests describe a CPU with native bf16; whether this machine has it must not change them."""
    import pipeline.config

    monkeypatch.setattr(pipeline.config, "cpu_has_native_bf16", lambda: True)


def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_emulated(monkeypatch):
    import pipeline.config

    monkeypatch.setattr(pipeline.config, "cpu_has_native_bf16", lambda: False)
    cfg, warnings = resolve(base_cfg(bf16={"enabled": True}))
    assert cfg["bf16"]["enabled"] is True  # the config's precision is kept
    assert warnings == [pipeline.config.BF16_EMULATED_ON_CPU_WARNING]
    assert resolve(base_cfg(bf16={"enabled": True}), accelerator="cuda")[1] == []


def resolve(cfg, world_size=2, train_steps=100, output_dir="/runs/r", accelerator="cpu"):
    return resolve_ds_config(cfg, world_size=world_size, train_steps=train_steps, output_dir=output_dir,
                             accelerator=accelerator)


def base_cfg(**extra):
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True}, **extra}


def auto_paths(node, path=""):
    if node == "auto":
        return [path]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in auto_paths(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in auto_paths(v, f"{path}[{i}]")]
    return []


# ---------------------------------------------------------------- batch arithmetic

@pytest.mark.parametrize("train, micro, accum, dp, expected", [
    ("auto", 4, 1, 2, (8, 4, 1)),
    (None, None, None, 1, (1, 1, 1)),
    ("auto", "auto", "auto", 3, (3, 1, 1)),
    (None, None, 3, 2, (6, 1, 3)),
    (None, 2, None, 4, (8, 2, 1)),
    (32, 4, "auto", 2, (32, 4, 4)),
    (32, "auto", 2, 2, (32, 8, 2)),
    (32, None, None, 4, (32, 8, 1)),
    (16, 4, 2, 2, (16, 4, 2)),
])
def test_resolve_batch(train, micro, accum, dp, expected):
    assert resolve_batch(train, micro, accum, dp) == expected


@pytest.mark.parametrize("train, micro, accum, dp, message", [
    (32, 4, 2, 2, "train_batch_size 32 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2 "
                  "x data-parallel size 2 = 16"),
    (8, 4, 1, 1, "train_batch_size 8 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 1 "
                 "x data-parallel size 1 = 4"),
    (30, 4, None, 2, "train_batch_size 30 is not a multiple of train_micro_batch_size_per_gpu 4 x data-parallel "
                     "size 2 = 8"),
    (30, "auto", 4, 2, "train_batch_size 30 is not a multiple of gradient_accumulation_steps 4 x data-parallel "
                       "size 2 = 8"),
    (3, None, None, 2, "train_batch_size 3 is not a multiple of gradient_accumulation_steps 1 x data-parallel "
                       "size 2 = 2"),
    (0, 4, 1, 1, "train_batch_size must be a positive integer"),
    (8, -4, None, 1, "train_micro_batch_size_per_gpu must be a positive integer"),
    (8, 4, 1.5, 1, "gradient_accumulation_steps must be a positive integer"),
    (8, 4, True, 1, "gradient_accumulation_steps must be a positive integer"),
    (8, "4", 1, 1, "train_micro_batch_size_per_gpu must be a positive integer"),
    (8, 4, 1, 0, "data-parallel size must be a positive integer"),
])
def test_resolve_batch_errors(train, micro, accum, dp, message):
    with pytest.raises(ValueError) as e:
        resolve_batch(train, micro, accum, dp)
    assert message in str(e.value)


def test_batch_error_in_resolve_explains_the_data_parallel_size():
    cfg = base_cfg(train_batch_size=32, gradient_accumulation_steps=2, pipeline={"stages": 2})
    with pytest.raises(ValueError) as e:
        resolve(cfg, world_size=4)
    assert "train_batch_size 32 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2 x " \
           "data-parallel size 2 = 16" in str(e.value)
    assert "world size 4 // pipeline stages 2" in str(e.value)


# ---------------------------------------------------------------- every shipped config

@pytest.fixture(scope="module")
def deepspeed_config_parser():
    """DeepSpeed's own parser, `DeepSpeedConfig(dict, mpu)`, with the data-parallel size we choose.

    DeepSpeedConfig asks deepspeed.comm for the rank and, given an mpu (DeepSpeed's hook for model
    parallelism), takes the data-parallel size from `mpu.get_data_parallel_world_size()`. Without a
    process group deepspeed.comm raises and the parser falls back to world size 1, ignoring the mpu;
    a real one-rank group on the CPU accelerator JIT-compiles DeepSpeed's shared-memory comm op
    (minutes on a cold cache). So the rank query alone is answered with 0."""
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    class DataParallel:
        def __init__(self, size):
            self.size = size

        def get_data_parallel_world_size(self):
            return self.size

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)
        yield lambda cfg, dp: DeepSpeedConfig(cfg, mpu=DataParallel(dp))


def test_the_design_names_are_shipped():
    assert DESIGN_NAMES <= {os.path.basename(p) for p in SHIPPED}


@pytest.mark.parametrize("accelerator", ["cpu", "cuda"])
@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_config_resolves_and_deepspeed_accepts_it(path, accelerator, deepspeed_config_parser, tmp_path):
    raw = load_ds_config(path)
    stages = pipeline_stages_of(raw)
    worlds = [w for w in (1, 2, 4) if w % stages == 0]
    for world in worlds:
        cfg, warnings = resolve(raw, world_size=world, train_steps=50, output_dir=str(tmp_path),
                                accelerator=accelerator)
        assert auto_paths(cfg) == []
        dp = world // stages
        assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * dp
        assert cfg["scheduler"]["params"]["total_num_steps"] == 50
        assert cfg["scheduler"]["params"]["warmup_num_steps"] == 2  # 50 // 20

        ds = deepspeed_config_parser(cfg, dp)
        assert ds.world_size == dp
        assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == \
            (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"])
        assert ds.zero_optimization_stage == zero_stage_of(cfg)
        precision = precision_of(cfg)
        assert (ds.float16_config.enabled, ds.bfloat16_config.enabled) == (precision == "fp16", precision == "bf16")
        assert ds.monitor_config.tensorboard.enabled
        assert ds.monitor_config.tensorboard.output_path == os.path.join(str(tmp_path), "tensorboard")
        assert ds.monitor_config.tensorboard.job_name == ""
        assert ds.gradient_clipping == 1.0

        if accelerator == "cpu":
            assert precision == "bf16"
            assert warnings == ([FP16_ON_CPU_WARNING] if precision_of(raw) == "fp16" else [])
            assert cfg["optimizer"]["params"]["torch_adam"] is True
        else:
            assert precision == precision_of(raw)
            assert warnings == []
            assert "torch_adam" not in cfg["optimizer"]["params"]


def test_shipped_zero3_configs_gather_weights_for_export():
    for path in SHIPPED:
        cfg = load_ds_config(path)
        if zero_stage_of(cfg) == 3:
            assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True, path


def test_pipe2_is_two_stages_with_zero1():
    cfg = load_ds_config(os.path.join(REPO, "ds_configs", "pipe2.json"))
    assert (pipeline_stages_of(cfg), zero_stage_of(cfg), precision_of(cfg)) == (2, 1, "bf16")
    with pytest.raises(ValueError, match="world size 3 is not a multiple of pipeline.stages 2"):
        resolve(cfg, world_size=3)


# ---------------------------------------------------------------- device adaptation

def test_fp16_becomes_bf16_on_cpu_with_one_warning():
    cfg = base_cfg(fp16={"enabled": True, "loss_scale": 0, "initial_scale_power": 16})
    del cfg["bf16"]
    resolved, warnings = resolve(cfg, accelerator="cpu")
    assert warnings == [FP16_ON_CPU_WARNING]
    assert "DeepSpeed refuses fp16 on CPU" in warnings[0] and "uses bf16 instead" in warnings[0]
    assert precision_of(resolved) == "bf16" and "fp16" not in resolved
    assert precision_of(cfg) == "fp16"  # the input is left alone

    resolved, warnings = resolve(cfg, accelerator="cuda")
    assert warnings == [] and precision_of(resolved) == "fp16"


def test_cpu_adam_uses_torch_unless_the_config_says():
    cfg = base_cfg(optimizer={"type": "Adam", "params": {"lr": 1e-3}})
    assert resolve(cfg, accelerator="cpu")[0]["optimizer"]["params"]["torch_adam"] is True
    cfg["optimizer"]["params"]["torch_adam"] = False
    assert resolve(cfg, accelerator="cpu")[0]["optimizer"]["params"]["torch_adam"] is False
    assert "torch_adam" not in resolve(base_cfg(optimizer={"type": "AdamW"}), accelerator="cuda")[0]["optimizer"]
    assert "torch_adam" not in resolve(base_cfg(optimizer={"type": "SGD", "params": {"lr": 0.1}}))[0]["optimizer"][
        "params"]


@pytest.mark.parametrize("stage", [2, 3])
def test_pipeline_with_zero2_or_3_is_rejected(stage):
    cfg = base_cfg(zero_optimization={"stage": stage}, pipeline={"stages": 2})
    with pytest.raises(ValueError, match="pipeline engine supports ZeRO stage 0 or 1 only"):
        resolve(cfg)


def test_pipeline_stages_set_the_data_parallel_size():
    cfg, _ = resolve(base_cfg(zero_optimization={"stage": 1}, pipeline={"stages": 2}), world_size=4)
    assert cfg["train_batch_size"] == 4 * 1 * 2
    cfg, _ = resolve(base_cfg(pipeline={"stages": "auto"}), world_size=2)
    assert cfg["pipeline"]["stages"] == 1 and cfg["train_batch_size"] == 8


# ---------------------------------------------------------------- "auto" and the rest of resolution

def test_scheduler_auto():
    sched = {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"}}
    cfg, _ = resolve(base_cfg(scheduler=sched), train_steps=1000)
    assert cfg["scheduler"]["params"] == {"total_num_steps": 1000, "warmup_num_steps": 50}
    cfg, _ = resolve(base_cfg(scheduler=sched), train_steps=10)
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 1
    # A concrete schedule length is the schedule's: warmup follows it, not --train-steps.
    sched["params"]["total_num_steps"] = 400
    cfg, _ = resolve(base_cfg(scheduler=sched), train_steps=10)
    assert cfg["scheduler"]["params"] == {"total_num_steps": 400, "warmup_num_steps": 20}


def test_unknown_auto_is_an_error_naming_the_key():
    cfg = base_cfg(zero_optimization={"stage": 2, "reduce_bucket_size": "auto"})
    with pytest.raises(ValueError, match=r"zero_optimization\.reduce_bucket_size"):
        resolve(cfg)


def test_tensorboard_always_goes_to_the_run_folder(tmp_path):
    cfg, warnings = resolve(base_cfg(), output_dir=str(tmp_path))
    assert cfg["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "tensorboard"), "job_name": ""}
    assert warnings == []
    cfg, warnings = resolve(base_cfg(tensorboard={"enabled": False, "output_path": "/elsewhere", "job_name": "x"}),
                            output_dir=str(tmp_path))
    assert cfg["tensorboard"]["output_path"] == str(tmp_path / "tensorboard") and cfg["tensorboard"]["enabled"]
    assert len(warnings) == 3


def test_resolve_leaves_its_input_alone():
    raw = load_ds_config(os.path.join(REPO, "ds_configs", "zero2_offload_fp16.json"))
    before = json.dumps(raw, sort_keys=True)
    resolve(raw)
    assert json.dumps(raw, sort_keys=True) == before


def test_bad_arguments_and_values():
    with pytest.raises(ValueError, match="world size"):
        resolve(base_cfg(), world_size=0)
    with pytest.raises(ValueError, match="train steps"):
        resolve(base_cfg(), train_steps=0)
    for accelerator in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="both true"):
            resolve(base_cfg(fp16={"enabled": True}), accelerator=accelerator)
    with pytest.raises(ValueError, match="zero_optimization.stage"):
        zero_stage_of({"zero_optimization": {"stage": 4}})
    with pytest.raises(ValueError, match="pipeline.stages"):
        pipeline_stages_of({"pipeline": {"stages": 0}})
    with pytest.raises(ValueError, match="bf16.enabled"):
        precision_of({"bf16": {"enabled": "auto"}})


def test_small_accessors():
    assert (precision_of({}), zero_stage_of({}), pipeline_stages_of({})) == ("fp32", 0, 1)
    assert precision_of({"bfloat16": {"enabled": True}}) == "bf16"


# ---------------------------------------------------------------- loading and compression

def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "bf16": {"enabled": true,}\n}\n')
    with pytest.raises(ValueError) as e:
        load_ds_config(str(path))
    assert str(e.value).startswith(f"{path}:3:")


def test_missing_file_and_duplicate_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_ds_config(str(tmp_path / "nope.json"))
    path = tmp_path / "dup.json"
    path.write_text('{"train_batch_size": 8, "train_batch_size": 16}')
    with pytest.raises(ValueError, match="duplicate key 'train_batch_size'"):
        load_ds_config(str(path))


def test_compression_training_points_at_the_compression_configs(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(base_cfg(compression_training={"weight_quantization": {}})))
    with pytest.raises(ValueError, match="ds_configs/compression/"):
        load_ds_config(str(path))


def test_split_compression():
    cfg = base_cfg(compression={"quantize": {"bits": 8}})
    rest, block = split_compression(cfg)
    assert block == {"quantize": {"bits": 8}} and "compression" not in rest and "compression" in cfg
    with pytest.raises(ValueError, match="split_compression"):
        resolve(cfg)
    resolve(rest)
    assert split_compression(base_cfg()) == (base_cfg(), None)
