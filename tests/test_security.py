"""Security: checkpoints load weights-only, exports are safetensors, no remote code runs, and hostfile and flag
values reach a shell only quoted."""
import ast
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import check_hostfile  # noqa: E402


class Payload:
    """Unpickling this runs `open(marker, "w")`: the stand-in for code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def deepspeed_objects():
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients}


# --- weights-only loading ----------------------------------------------------------------------------------

def test_zero0_model_states_load_weights_only_with_deepspeed_classes(tmp_path):
    import export_checkpoint

    folder = tmp_path / "checkpoints" / "global_step1"
    folder.mkdir(parents=True)
    weights = {"w": torch.arange(4, dtype=torch.bfloat16)}
    # What DeepSpeed writes besides the module: its config, version, and (for other optimizers) its own classes.
    torch.save({"module": weights, "ds_version": "0.19.8", "ds_config": {"zero_optimization": {"stage": 0}},
                "optimizer": deepspeed_objects()}, folder / "mp_rank_00_model_states.pt")
    state = export_checkpoint.checkpoint_state_dict(str(tmp_path / "checkpoints"), "global_step1")
    assert state["w"].dtype == torch.float32 and state["w"].tolist() == [0, 1, 2, 3]


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(tmp_path):
    import export_checkpoint

    marker = tmp_path / "payload_ran"
    folder = tmp_path / "checkpoints" / "global_step1"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}, "extra": Payload(marker)}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt: refusing to load"):
        export_checkpoint.checkpoint_state_dict(str(tmp_path / "checkpoints"), "global_step1")
    assert not marker.exists()
    # A ZeRO checkpoint goes through DeepSpeed's consolidation, which unpickles with weights_only=False: each of
    # its files is loaded weights-only first, and a bad one stops the export before DeepSpeed reads anything.
    torch.save({"module": {"w": torch.zeros(2)}}, folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {**deepspeed_objects(), "evil": Payload(marker)}},
               folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: refusing to load"):
        export_checkpoint.checkpoint_state_dict(str(tmp_path / "checkpoints"), "global_step1")
    assert not marker.exists()


def test_deepspeed_optimizer_states_pass_the_weights_only_check(tmp_path):

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {**deepspeed_objects(), "fp32_flat_groups": [torch.ones(3)]},
                "ds_config": {}, "ds_version": "0.19.8"}, path)
    from pipeline import training

    loaded = training.load_weights_only(str(path), mmap=True)
    assert loaded["optimizer_state_dict"]["fp32_flat_groups"][0].tolist() == [1, 1, 1]


def python_sources():
    for top in ("pipeline", "tools"):
        for root, _, names in os.walk(os.path.join(REPO, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    yield path, ast.parse(open(path, encoding="utf-8").read(), path)


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only():
    for path, tree in python_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                value = keyword(node, "weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{node.lineno}"


# --- no remote code ----------------------------------------------------------------------------------------

def test_every_hf_load_passes_trust_remote_code_false():
    for path, tree in python_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("from_pretrained", "from_config") and not path.endswith("benchmark.py"):
                value = keyword(node, "trust_remote_code")
                if value is None and any(k.arg is None for k in node.keywords):
                    continue  # **kwargs: checked where the dict is built (finetune's `common`)
                assert isinstance(value, ast.Constant) and value.value is False, f"{path}:{node.lineno}"
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, path


@pytest.fixture
def remote_code_model(tmp_path):
    """A model folder whose config asks for its own Python code; importing that code writes a marker."""
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil_custom", "architectures": ["EvilForSequenceClassification"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'code_ran')!r}, 'w')\n")
    return folder


@pytest.mark.parametrize("stage", ["predict", "finetune"])
def test_a_model_folder_with_custom_code_is_refused_without_running_it(stage, remote_code_model, tmp_path,
                                                                      monkeypatch, capsys):
    from pipeline import finetune, predict
    from pipeline.cli import run_main

    data = os.path.join(REPO, "data", "sentiment", "valid.jsonl")
    argv = (["--model", str(remote_code_model), "--input", data] if stage == "predict" else
            ["--train", data, "--valid", data, "--init", str(remote_code_model), "--deepspeed_config",
             os.path.join(REPO, "ds_configs", "zero0.json"), "--output", str(tmp_path / "run")])
    monkeypatch.setattr(sys, "argv", [stage, *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_main({"predict": predict, "finetune": finetune}[stage].main, stage)
    assert exit_info.value.code == 2
    assert "custom code" in capsys.readouterr().err
    assert not (tmp_path / "code_ran").exists()


def test_exports_are_safetensors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.export import save_hf

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    save_hf(model, None, str(tmp_path / "hf"))
    names = os.listdir(tmp_path / "hf")
    assert "model.safetensors" in names and not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]


# --- quoting -----------------------------------------------------------------------------------------------

def test_launch_commands_quote_paths_hosts_and_arguments(tmp_path, capsys):
    folder = tmp_path / "my hosts; rm -rf ~"
    folder.mkdir()
    hostfile = folder / "two nodes $(reboot)"
    hostfile.write_text("node-a.example slots=2\n10.0.0.7 slots=2\n")
    script = ["pipeline/pretrain.py", "--data", "my data`id`", "--output", "runs/it's mine", "--seed", "&&"]
    assert check_hostfile.main([str(hostfile), "--", *script]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if "deepspeed --hostfile" in line]
    assert len(lines) == 3  # the pdsh command and one per node
    for line in lines:
        argv = shlex.split(line.split(": ", 1)[1] if line.startswith("node") else line)
        assert argv[:3] == ["deepspeed", "--hostfile", str(hostfile)]
        assert argv[-len(script):] == script  # each value comes back as exactly one word, unchanged
        assert argv[argv.index("--master_addr") + 1] == "node-a.example"


def test_the_printed_command_runs_as_is(tmp_path, capsys):
    # The strongest check of the quoting: hand the printed command to a real shell, with `deepspeed` a stub that
    # prints its arguments one per line.
    hostfile = tmp_path / "hosts; touch pwned"
    hostfile.write_text("node-a slots=1\n")
    script = ["train.py", "--name", "a b", "--x", "$(touch pwned)", "--y", "'quoted'"]
    check_hostfile.main([str(hostfile), "--", *script])
    command = next(line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines() if "node 0: deepspeed" in line)
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "deepspeed").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (stub / "deepspeed").chmod(0o755)
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{stub}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["--hostfile", str(hostfile)]
    assert done.stdout.splitlines()[-len(script):] == script
    assert not (tmp_path / "pwned").exists()


def test_host_names_that_a_shell_or_ssh_would_misread_are_errors(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("good-host slots=1\nbad$(id) slots=1\n-oProxyCommand=sh slots=1\n[fe80::1%eth0] slots=1\n")
    assert check_hostfile.main([str(hostfile)]) == 2
    err = capsys.readouterr().err
    assert f"{hostfile}:2: 'bad$(id)' is not a host name" in err
    assert f"{hostfile}:3: '-oProxyCommand=sh' is not a host name" in err
    assert ":1:" not in err and ":4:" not in err  # a DNS name and an IPv6 address are fine


def test_ssh_check_never_reads_a_host_as_an_option(monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(check_hostfile.subprocess, "run", fake_run)
    assert check_hostfile.check_ssh("node-a", 2222, 5) is None
    assert isinstance(seen[0], list) and seen[0][-3:] == ["--", "node-a", "true"]


def test_makefile_passes_the_demo_folder_as_one_word(tmp_path):
    demo_dir = "my dir; echo 'pwned'"
    done = subprocess.run(["make", "-n", "demo", f"DEMO_DIR={demo_dir}"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    line = next(line for line in done.stdout.splitlines() if "tools/demo.sh" in line)
    assert shlex.split(line) == ["bash", "tools/demo.sh", demo_dir]
