"""End-to-end pretraining on CPU: 2 gloo ranks under the real deepspeed launcher, tiny models."""
import json
import math
import os
import re

import pytest

from tests.conftest import REPO, fp32_args, fp32_config, run_as_main, run_stage, scalars

pytestmark = pytest.mark.slow
STEPS = 12


def config_path(name):
    return os.path.join(REPO, "ds_configs", name)


def fast_config(name, tmp_path, fp32=False, **scheduler):
    """A shipped config with a learning rate for a tiny model on a dozen steps (the shipped 3e-4
    suits real runs; here the loss must visibly fall in 12 steps), optionally in fp32."""
    ds = json.load(open(config_path(name)))
    ds["optimizer"]["params"]["lr"] = 3e-3
    ds["scheduler"]["params"].update(scheduler)
    if fp32:
        ds["bf16"] = {"enabled": False}
    path = tmp_path / f"fast_{'fp32_' if fp32 else ''}{name}"
    path.write_text(json.dumps(ds))
    return str(path)


def pretrain_args(prepared, run, config, steps=STEPS, extra=()):
    return ["--data", prepared, "--model", "tiny", "--deepspeed_config", config,
            "--output", str(run), "--train-steps", str(steps), "--seq-length", "64", "--log-interval", "1",
            "--eval-interval", "6", "--eval-batches", "2", "--save-interval", "6", "--seed", "3", *extra]


def pretrain(prepared, run, config, ranks=2, steps=STEPS, extra=(), check=True):
    return run_stage("pretrain.py", pretrain_args(prepared, run, config, steps, extra), ranks=ranks, check=check)


def pretrain_in_process(args, monkeypatch, capsys):
    """`python -m pipeline.pretrain ARGS` for what ends before any process group starts: (exit status, stdout,
    stderr)."""
    code = run_as_main("pipeline.pretrain", args, monkeypatch)
    out = capsys.readouterr()
    return code, out.out, out.err


def losses(run):
    return [v for _, v in sorted(scalars(run, "Train/loss").items())]


@pytest.fixture(scope="module")
def zero2_run(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # total_num_steps fixed (not "auto") so that the resume test can stop early on the same schedule.
    pretrain(prepared, root / "zero2", fast_config("zero2.json", root, total_num_steps=STEPS, warmup_num_steps=2))
    return root / "zero2"


def test_zero2_trains_and_writes_the_run_folder(zero2_run):
    summary = json.load(open(zero2_run / "summary.json"))
    assert summary["steps"] == STEPS and summary["world_size"] == 2 and summary["zero_stage"] == 2
    assert summary["precision"] == "bf16" and summary["pipeline_stages"] == 1
    assert summary["tokens_per_sec"] > 0 and math.isclose(summary["eval_ppl"], math.exp(summary["eval_loss"]), rel_tol=1e-6)
    curve = losses(zero2_run)
    assert len(curve) == STEPS and curve[-1] < curve[0] - 0.5  # the loss falls
    assert abs(summary["train_loss"] - curve[-1]) < 1e-6
    for tag in ("Train/lr", "Train/grad_norm", "Train/tokens_per_sec", "Eval/loss", "Eval/ppl"):
        assert scalars(zero2_run, tag), tag
    ds = json.load(open(zero2_run / "ds_config.json"))
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert open(zero2_run / "checkpoints" / "latest").read() == f"global_step{STEPS}"
    assert sorted(d for d in os.listdir(zero2_run / "checkpoints") if not d.endswith(".py")) == [
        "global_step12", "global_step6", "latest"]


def test_export_reloads_with_transformers_and_reproduces_eval_loss(zero2_run, prepared):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data import TokenShards
    from pipeline.data.packing import PackedWindows

    summary = json.load(open(zero2_run / "summary.json"))
    model = AutoModelForCausalLM.from_pretrained(zero2_run / "hf").eval()
    tok = AutoTokenizer.from_pretrained(zero2_run / "hf")
    assert tok.eos_token_id == 3
    windows = PackedWindows(TokenShards(prepared, "valid"), 64, eos_id=3)
    n = min(len(windows), 2 * 4 * 2)  # eval_batches x micro x ranks, as the run evaluated
    ids = torch.from_numpy(np.stack([windows[k] for k in range(n)]))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert abs(loss - summary["eval_loss"]) < 0.02 * summary["eval_loss"]


def test_zero_stages_give_the_same_losses(fp32_zero2_run, prepared, tmp_path):
    # In fp32 the stages differ only in reduction order, so the curves agree tightly; in bf16 the
    # gradients are reduced in bf16 by ZeRO-1/2/3 and in fp32 by ZeRO-0, and at this learning rate
    # the curves drift apart by a few hundredths within 6 steps. ZeRO-2: the shared 12-step fp32 run
    # (tests/conftest.py), whose first 6 steps the 6-step runs on the same schedule must reproduce.
    curves = {"zero2.json": losses(fp32_zero2_run)[:6]}
    for config in ("zero0.json", "zero3.json"):
        args = fp32_args(prepared, fp32_config(tmp_path, config), tmp_path / config, steps=6)
        run_stage("pretrain.py", [*args, "--save-interval", "0"])
        curves[config] = losses(tmp_path / config)
    for curve in curves.values():
        assert len(curve) == 6 and curve[-1] < curve[0]
    for curve in curves.values():
        assert curve == pytest.approx(curves["zero0.json"], abs=1e-3), curves


def test_offload_trains(prepared, tmp_path):
    pretrain(prepared, tmp_path / "off", fast_config("zero2_offload.json", tmp_path), steps=6,
             extra=["--save-interval", "0"])
    curve = losses(tmp_path / "off")
    assert len(curve) == 6 and curve[-1] < curve[0]


def test_resume_continues_the_uninterrupted_loss_curve(zero2_run, two_node_run, prepared, tmp_path):
    # The two-node run is zero2_run's schedule stopped at step 6 (its final checkpoint); extended here to 12 steps
    # on one node, it continues the uninterrupted curve.
    import shutil

    part = tmp_path / "part"
    shutil.copytree(two_node_run, part)
    r = pretrain(prepared, part, fast_config("zero2.json", tmp_path, total_num_steps=STEPS, warmup_num_steps=2))
    assert "resumed from" in r.stdout and "at step 6" in r.stdout
    assert losses(part) == pytest.approx(losses(zero2_run), abs=1e-6)


def test_one_process_without_launcher_and_fp16_falls_back_to_bf16(prepared, tmp_path):
    ds = json.load(open(config_path("zero1_fp16.json")))
    ds["activation_checkpointing"] = {"partition_activations": False}  # the block turns recomputation on
    (tmp_path / "fp16_ckpt.json").write_text(json.dumps(ds))
    r = pretrain(prepared, tmp_path / "one", str(tmp_path / "fp16_ckpt.json"), ranks=0, steps=4,
                 extra=["--save-interval", "0"])
    assert "DeepSpeed refuses fp16 on CPU" in r.stderr and "activation checkpointing: on" in r.stdout
    summary = json.load(open(tmp_path / "one" / "summary.json"))
    assert summary["world_size"] == 1 and summary["precision"] == "bf16" and summary["steps"] == 4


def test_masked_lm_trains_and_exports(prepared, tmp_path):
    from transformers import AutoModelForMaskedLM

    run = tmp_path / "mlm"
    args = ["--data", prepared, "--model", "bert-tiny", "--objective", "mlm", "--deepspeed_config",
            fast_config("zero1.json", tmp_path), "--output", str(run), "--train-steps", "10", "--seq-length", "64",
            "--log-interval", "1", "--eval-interval", "0", "--save-interval", "0", "--eval-batches", "2"]
    run_stage("pretrain.py", args, ranks=0)
    curve = losses(run)
    assert curve[-1] < curve[0]
    assert AutoModelForMaskedLM.from_pretrained(run / "hf").config.model_type == "bert"


def test_dry_run_prints_batch_arithmetic_without_training(prepared, tmp_path, monkeypatch, capsys):
    code, out, _ = pretrain_in_process(pretrain_args(prepared, tmp_path / "dry", config_path("zero2.json"),
                                                     extra=["--dry-run"]), monkeypatch, capsys)
    assert code == 0 and "train_batch_size" in out and "parameters" in out
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("extra, message", [
    (["--model", "no-such-preset"], "not a preset"),
    (["--seq-length", "4096"], "above the model's maximum"),
    (["--objective", "mlm"], "trains with --objective clm"),
])
def test_bad_input_fails_before_start(prepared, tmp_path, monkeypatch, capsys, extra, message):
    args = pretrain_args(prepared, tmp_path / "bad", config_path("zero2.json"), extra=extra)
    code, _, err = pretrain_in_process(args, monkeypatch, capsys)
    assert code != 0 and message in err
    assert not (tmp_path / "bad").exists()


def test_missing_data_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    args = ["--data", str(tmp_path / "nope"), "--deepspeed_config", config_path("zero0.json"),
            "--output", str(tmp_path / "run"), "--train-steps", "1"]
    code, _, err = pretrain_in_process(args, monkeypatch, capsys)
    assert code == 2 and "prepare it first" in err


def test_non_finite_loss_stops_the_run_with_the_step(prepared, tmp_path):
    ds = json.load(open(config_path("zero0.json")))
    ds["optimizer"]["params"]["lr"] = 1e30  # one update blows the weights past what attention can hold
    ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e30, "warmup_max_lr": 1e30, "warmup_num_steps": 1}}
    (tmp_path / "explode.json").write_text(json.dumps(ds))
    r = pretrain(prepared, tmp_path / "nan", str(tmp_path / "explode.json"), ranks=0, steps=8,
                 extra=["--log-interval", "4", "--save-interval", "0"], check=False)
    assert r.returncode == 2 and re.search(r"not finite \(nan\) at step [2-8]:", r.stderr), r.stderr[-2000:]
    assert not (tmp_path / "nan" / "summary.json").exists()


def test_export_tool_writes_any_checkpoint_as_hf(zero2_run, tmp_path, monkeypatch):
    # The tools' __main__ in this process (their command lines in subprocesses: tests/test_convert_checkpoint.py).
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "step6"
    assert run_as_main("tools/export_checkpoint.py", [str(zero2_run), "--tag", "global_step6", "--output", str(out)],
                       monkeypatch) == 0
    final = tmp_path / "step12"  # the same through convert_checkpoint.py, latest checkpoint
    assert run_as_main("tools/convert_checkpoint.py", [str(zero2_run), "--to", "hf", "--output", str(final)],
                       monkeypatch) == 0
    ids = torch.arange(64).reshape(1, 64) + 10
    with torch.no_grad():
        logits = {p.name: AutoModelForCausalLM.from_pretrained(p).float()(input_ids=ids).logits
                  for p in (out, final, zero2_run / "hf")}
    # The run's own export holds the bf16 weights it trained with; the tool's the fp32 masters.
    assert torch.allclose(logits["step12"], logits["hf"], atol=0.1)
    assert not torch.allclose(logits["step6"], logits["step12"], atol=0.1)


@pytest.fixture(scope="module")
def two_node_run(prepared, tmp_path_factory):
    """zero2_run's config and schedule for 6 steps, by two `deepspeed --no_ssh --node_rank I` launchers against one
    hostfile (loopback addresses as the two nodes), 1 rank each; it ends with its checkpoint of step 6."""
    import subprocess

    from tests.conftest import free_port

    root = tmp_path_factory.mktemp("two_nodes")
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    config = fast_config("zero2.json", root, total_num_steps=STEPS, warmup_num_steps=2)
    port, run = free_port(), root / "run"
    args = ["--data", prepared, "--model", "tiny", "--deepspeed_config", config, "--output", str(run),
            "--train-steps", "6", "--seq-length", "64", "--log-interval", "1", "--eval-interval", "0",
            "--eval-batches", "2", "--save-interval", "6", "--seed", "3"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    nodes = [subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "pipeline/pretrain.py", *args],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [n.communicate(timeout=900)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return run


def test_two_nodes_without_ssh_match_one_node(zero2_run, two_node_run):
    """The two-node run: world size 2, the same losses as the one-node 2-rank run."""
    assert json.load(open(two_node_run / "summary.json"))["world_size"] == 2
    assert losses(two_node_run) == pytest.approx(losses(zero2_run)[:6], abs=1e-6)
    assert open(two_node_run / "checkpoints" / "latest").read() == "global_step6"


def test_universal_checkpoint_resumes_at_another_world_size(zero2_run, prepared, tmp_path, monkeypatch):
    """Stop a 2-rank ZeRO-2 run at step 6, convert to DeepSpeed's universal format, continue on 1 rank
    with the same global batch (micro 4 x accumulation 2): the loss curve carries on."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    (run / "checkpoints" / "latest").write_text("global_step6")
    assert run_as_main("tools/convert_checkpoint.py", [str(run), "--to", "universal"], monkeypatch) == 0
    assert (run / "checkpoints" / "latest").read_text() == "global_step6_universal"
    ds = json.load(open(fast_config("zero2.json", tmp_path, total_num_steps=STEPS, warmup_num_steps=2)))
    ds["train_batch_size"], ds["gradient_accumulation_steps"] = 8, "auto"
    (tmp_path / "one_rank.json").write_text(json.dumps(ds))
    shutil.rmtree(run / "tensorboard")
    r = pretrain(prepared, run, str(tmp_path / "one_rank.json"), ranks=0)
    assert "at step 6" in r.stdout
    resumed = [v for s, v in sorted(scalars(run, "Train/loss").items())]
    assert len(resumed) == STEPS - 6
    assert resumed == pytest.approx(losses(zero2_run)[6:], abs=0.05)
