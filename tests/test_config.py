"""pipeline.config: batch arithmetic, "auto" filling, the LR schedule against --train-steps, CPU adaptation,
DeepSpeed's own parser run on every resolved config, and every shipped DeepSpeed JSON accepted by DeepSpeed as
it stands; the stages' command line."""
import glob
import json
import os
import re

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
EVERY_SHIPPED = SHIPPED + sorted(glob.glob(os.path.join(REPO, "ds_configs", "compression", "*.json")))
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
        # The shipped schedule is the JSON's; this 50-step run stops partway through it (one line says so).
        assert cfg["scheduler"]["params"] == raw["scheduler"]["params"]
        schedule_note = [w for w in warnings if "scheduler.params.total_num_steps" in w]
        assert len(schedule_note) == 1 and "this run trains 50: it stops at step 50 of it" in schedule_note[0]
        warnings = [w for w in warnings if w not in schedule_note]

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


def deepspeed_scheduler(cfg):
    """The LR scheduler deepspeed.initialize would build from this config (engine._scheduler_from_config), on a
    one-parameter optimizer."""
    import torch
    from deepspeed.runtime import lr_schedules

    sched = cfg["scheduler"]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg["optimizer"]["params"]["lr"])
    return getattr(lr_schedules, sched["type"])(optimizer, **sched["params"])


@pytest.mark.parametrize("path", EVERY_SHIPPED, ids=lambda p: os.path.relpath(p, os.path.join(REPO, "ds_configs")))
def test_shipped_json_is_valid_for_plain_deepspeed_as_it_stands(path, deepspeed_config_parser):
    """DESIGN: a config in ds_configs/ is valid for plain DeepSpeed as it stands (a compression config once its
    `compression` block is set aside): DeepSpeed's parser takes the raw file and its scheduler builds."""
    with open(path) as f:
        raw, block = split_compression(json.load(f))
    assert (block is not None) == ("compression" in path)
    assert auto_paths(raw) == [] and "train_batch_size" not in raw  # DeepSpeed derives it: micro x accum x dp
    for dp in (1, 2):
        ds = deepspeed_config_parser(raw, dp)
        assert ds.train_batch_size == raw["train_micro_batch_size_per_gpu"] * raw["gradient_accumulation_steps"] * dp
    # Used as it stands, TensorBoard writes to ./tensorboard (a stage: RUN/tensorboard), not to a folder "auto".
    assert ds.monitor_config.tensorboard.output_path == "tensorboard"
    scheduler = deepspeed_scheduler(raw)
    params = raw["scheduler"]["params"]
    assert 0 < params["warmup_num_steps"] < params["total_num_steps"]
    peak = raw["optimizer"]["params"]["lr"]
    for _ in range(params["total_num_steps"] + 5):
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(peak * params["cos_min_ratio"])  # warmup, then cosine down


def test_the_shipped_tensorboard_path_is_the_run_folder_without_a_warning(tmp_path):
    raw = load_ds_config(os.path.join(REPO, "ds_configs", "zero1.json"))
    cfg, warnings = resolve(raw, train_steps=raw["scheduler"]["params"]["total_num_steps"], output_dir=str(tmp_path))
    assert cfg["tensorboard"]["output_path"] == str(tmp_path / "tensorboard") and warnings == []


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
    params = resolve(cfg, accelerator="cpu")[0]["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    cfg["optimizer"]["params"]["foreach"] = True  # the user's choice of torch implementation is kept
    params = resolve(cfg, accelerator="cpu")[0]["optimizer"]["params"]
    assert params["foreach"] is True and "fused" not in params
    cfg["optimizer"]["params"] = {"lr": 1e-3, "torch_adam": False}  # DeepSpeed's own op: no torch arguments
    params = resolve(cfg, accelerator="cpu")[0]["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params
    assert "torch_adam" not in resolve(base_cfg(optimizer={"type": "AdamW"}), accelerator="cuda")[0]["optimizer"]
    assert "fused" not in resolve(base_cfg(optimizer={"type": "AdamW"}), accelerator="cuda")[0]["optimizer"].get(
        "params", {})
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

def test_a_concrete_schedule_is_kept_and_one_line_says_where_the_run_stops():
    """The rule (README, DeepSpeed configs): total_num_steps is the schedule's length, as for DeepSpeed; --train-steps
    is where the run stops. Identical in every stage: they all resolve through resolve_ds_config."""
    sched = {"type": "WarmupCosineLR", "params": {"total_num_steps": 1000, "warmup_num_steps": 10}}
    cfg, warnings = resolve(base_cfg(scheduler=sched), train_steps=1000)
    assert cfg["scheduler"]["params"] == sched["params"] and warnings == []  # the run is the schedule: nothing said

    cfg, warnings = resolve(base_cfg(scheduler=sched), train_steps=200)
    assert cfg["scheduler"]["params"] == sched["params"]
    assert warnings == ["the LR schedule is 1000 steps long (scheduler.params.total_num_steps) and this run trains "
                        "200: it stops at step 200 of it. The JSON's schedule is kept, so a run stopped early resumes "
                        "on it; \"total_num_steps\": \"auto\" fits the schedule to the run"]

    cfg, warnings = resolve(base_cfg(scheduler=sched), train_steps=1500)
    assert cfg["scheduler"]["params"] == sched["params"]
    assert len(warnings) == 1 and "it trains 500 steps past its end" in warnings[0]


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
    # WarmupLR has no total: its warmup follows the run.
    cfg, warnings = resolve(base_cfg(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}),
                            train_steps=200)
    assert cfg["scheduler"]["params"] == {"warmup_num_steps": 10} and warnings == []


def test_a_missing_train_batch_size_is_derived_like_auto():
    cfg = base_cfg()
    del cfg["train_batch_size"]
    assert resolve(cfg, world_size=2)[0]["train_batch_size"] == 4 * 1 * 2
    assert resolve(cfg, world_size=2)[0] == resolve(base_cfg(), world_size=2)[0]


@pytest.mark.parametrize("change, message", [
    ({"zero_optimization": {"stage": 2, "bogus_key": 1}},
     "DeepSpeed rejects it: DeepSpeedZeroConfig: bogus_key: Extra inputs are not permitted"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "disk"}}},
     "DeepSpeed rejects it: DeepSpeedZeroConfig: offload_param.device: Input should be"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_num_steps": 0}}},
     "DeepSpeed rejects it: warmup_num_steps must be a positive integer, got 0"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_steps": 5}}},
     "DeepSpeed rejects it: WarmupCosineLR.__init__() got an unexpected keyword argument 'warmup_steps'"),
    ({"scheduler": {"type": "NoSuchLR", "params": {}}},
     "DeepSpeed rejects it: scheduler.type 'NoSuchLR' is neither a DeepSpeed LR schedule nor in torch.optim"),
])
def test_a_config_deepspeed_rejects_is_an_error_naming_the_file(change, message):
    with pytest.raises(ValueError) as e:
        resolve_ds_config(base_cfg(**change), world_size=2, train_steps=100, output_dir="/runs/r", accelerator="cpu",
                          source="my.json")
    assert str(e.value).startswith(f"my.json: {message}")
    assert "\n" not in str(e.value)


def test_a_config_deepspeed_rejects_fails_the_dry_run_before_the_run_folder(prepared, tmp_path):
    """The stages resolve before anything starts, --dry-run included; pretrain stands for all three."""
    from pipeline import pretrain

    path = tmp_path / "bogus.json"
    raw = load_ds_config(os.path.join(REPO, "ds_configs", "zero2.json"))
    raw["zero_optimization"]["bogus_key"] = True
    path.write_text(json.dumps(raw))
    for extra in (["--dry-run"], []):
        with pytest.raises(ValueError, match=f"^{path}: DeepSpeed rejects it: .*bogus_key"):
            pretrain.main(["--data", prepared, "--model", "tiny", "--deepspeed_config", str(path), "--output",
                           str(tmp_path / "run"), "--train-steps", "2", *extra])
    assert not (tmp_path / "run").exists()


def test_unknown_auto_is_an_error_naming_the_key():
    cfg = base_cfg(zero_optimization={"stage": 2, "reduce_bucket_size": "auto"})
    with pytest.raises(ValueError, match=r"zero_optimization\.reduce_bucket_size"):
        resolve(cfg)


@pytest.mark.parametrize("block, ignored", [
    ({"partition_activations": True, "cpu_checkpointing": True, "contiguous_memory_optimization": False},
     "partition_activations, cpu_checkpointing ignored"),
    ({"contiguous_memory_optimization": True, "number_checkpoints": 4}, "contiguous_memory_optimization, "
                                                                        "number_checkpoints ignored"),
])
def test_ignored_activation_checkpointing_options_get_one_warning(block, ignored):
    cfg, warnings = resolve(base_cfg(activation_checkpointing=block))
    assert len(warnings) == 1 and warnings[0].startswith(f"activation_checkpointing: {ignored}")
    assert cfg["activation_checkpointing"] == block  # the block still turns recomputation on
    assert resolve(base_cfg(activation_checkpointing={"partition_activations": False}))[1] == []
    assert resolve(base_cfg(activation_checkpointing={}))[1] == []


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


# ---------------------------------------------------------------- the command line (pipeline/cli.py)

def test_the_deepspeed_flag_is_accepted_and_ignored(prepared, tmp_path, capsys):
    """`deepspeed.add_config_arguments` defines --deepspeed; the usual `script.py --deepspeed --deepspeed_config X`
    works (argparse called it an ambiguous prefix of --deepspeed_config before)."""
    from pipeline import pretrain

    pretrain.main(["--data", prepared, "--model", "tiny", "--deepspeed", "--deepspeed_config",
                   os.path.join(REPO, "ds_configs", "zero0.json"), "--output", str(tmp_path / "run"),
                   "--train-steps", "2", "--dry-run", "--local_rank=0"])
    assert "train_batch_size" in capsys.readouterr().out
    from pipeline.cli import build_parser

    assert not re.search(r"--deepspeed(?![\w-])", build_parser(pretrain.Args, "").format_help())  # hidden
