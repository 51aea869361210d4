"""`pretrain --compile`: DeepSpeed's engine.compile on the model, in place.

The tests trace with torch.compile's `eager` backend (dynamo captures the graph, no code generation:
seconds instead of a minute of inductor compiling on a CPU), so the numbers must be exactly those of an
uncompiled run; what they check is the wiring: the whole step runs through the compiled module, the
checkpoint and the HF export keep the model's own parameter names.
"""
import json
import os

import pytest

from tests.conftest import REPO, run_stage, scalars

pytestmark = pytest.mark.slow


def pretrain(prepared, run, config, extra=(), check=True, env=None):
    args = ["--data", prepared, "--model", "tiny", "--deepspeed_config", config, "--output", str(run),
            "--train-steps", "3", "--seq-length", "32", "--log-interval", "1", "--eval-interval", "0",
            "--eval-batches", "1", "--save-interval", "0", "--seed", "5", *extra]
    return run_stage("pretrain.py", args, ranks=0, check=check, env=env)


def test_compiled_run_matches_the_uncompiled_one_and_exports(prepared, tmp_path):
    from safetensors import safe_open

    config = os.path.join(REPO, "ds_configs", "zero2.json")  # bf16 as shipped
    pretrain(prepared, tmp_path / "eager", config)
    r = pretrain(prepared, tmp_path / "compiled", config, extra=["--compile", "--compile-backend", "eager"])
    assert "torch.compile: on (eager)" in r.stdout
    eager, compiled = scalars(tmp_path / "eager", "Train/loss"), scalars(tmp_path / "compiled", "Train/loss")
    assert len(compiled) == 3 and compiled == eager
    summary = json.load(open(tmp_path / "compiled" / "summary.json"))
    assert summary["eval_loss"] == json.load(open(tmp_path / "eager" / "summary.json"))["eval_loss"]
    with safe_open(str(tmp_path / "compiled" / "hf" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any("_orig_mod" in n for n in names)


def test_compile_with_a_pipelined_config_is_refused(prepared, tmp_path):
    config = os.path.join(REPO, "ds_configs", "pipe2.json")  # 2 stages: resolved as for 2 ranks, in a dry run
    r = pretrain(prepared, tmp_path / "pipe", config, extra=["--compile", "--dry-run"], check=False,
                 env={"WORLD_SIZE": "2"})
    assert r.returncode == 2 and "--compile does not apply to a pipelined model" in r.stderr
    assert not (tmp_path / "pipe").exists()
