"""tools/convert_checkpoint.py and tools/export_checkpoint.py: universal checkpoints export to HF (ZeRO-3 and
pipeline names), a ZeRO-0 fp32 checkpoint is refused in one line, args.json paths resolve from anywhere."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, run_as_main, run_stage

sys.path.insert(0, os.path.join(REPO, "tools"))
import export_checkpoint  # noqa: E402


def tool(name, *args, cwd=REPO, check=True):
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{name} {args} exited {r.returncode}\n{r.stderr[-4000:]}")
    return r


def weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def zero3_run(prepared, tmp_path_factory):
    """ZeRO-3 (bf16, as shipped) in one process, 4 steps, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("zero3") / "run"
    run_stage("pretrain.py", ["--data", prepared, "--model", "tiny", "--deepspeed_config",
                              os.path.join(REPO, "ds_configs", "zero3.json"), "--output", str(run), "--train-steps", "4",
                              "--seq-length", "64", "--eval-interval", "0", "--eval-batches", "1", "--save-interval", "2"],
              ranks=0)
    return run


@pytest.mark.slow
def test_zero3_checkpoint_to_universal_then_to_hf(zero3_run, tmp_path, monkeypatch, capsys):
    """After --to universal, `latest` names the universal tag; --to hf reads its fp32.pt files (ZeRO-3 keeps each
    parameter flattened there) and gives exactly the weights the ZeRO-3 consolidation gives. (--to hf runs the
    tool's __main__ in this process; --to universal its command line.)"""
    direct = tmp_path / "direct"
    argv = [str(zero3_run), "--to", "hf", "--tag", "global_step4", "--output", str(direct)]
    assert run_as_main("tools/convert_checkpoint.py", argv, monkeypatch) == 0
    tool("convert_checkpoint.py", zero3_run, "--to", "universal")
    assert (zero3_run / "checkpoints" / "latest").read_text() == "global_step4_universal"
    universal = tmp_path / "universal"
    capsys.readouterr()
    assert run_as_main("tools/convert_checkpoint.py", [str(zero3_run), "--to", "hf", "--output", str(universal)],
                       monkeypatch) == 0
    assert "global_step4_universal" in capsys.readouterr().out
    a, b = weights(direct), weights(universal)
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The run's own export (bf16 weights it trained with) is the same model.
    from transformers import AutoModelForCausalLM

    ids = torch.arange(32).reshape(1, 32) + 10
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(p).float()(input_ids=ids).logits for p in (universal, zero3_run / "hf")]
    assert torch.allclose(*logits, atol=0.1)
    # A universal tag cannot be converted again.
    r = tool("convert_checkpoint.py", zero3_run, "--to", "universal", check=False)
    assert r.returncode == 2 and "already a universal checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_pipeline_universal_names_map_to_hf(tmp_path):
    """A pipeline run's universal files are named LAYER.hf.NAME, the tied embedding tied_modules.embed.hf.NAME
    (what ds_to_universal writes for pipe2.json): they map back to the HF state dict."""
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_model_config, pipe

    config, _ = load_model_config("tiny", 100, {})
    state = AutoModelForCausalLM.from_config(config).state_dict()
    folder = tmp_path / "global_step4_universal"
    for idx, layer in pipe.hf_to_pipe(state, config).items():
        for key, value in layer.items():
            name = f"tied_modules.{pipe.TIE_KEY}.{key}" if idx == 0 and config.tie_word_embeddings else f"{idx}.{key}"
            (folder / "zero" / name).mkdir(parents=True)
            torch.save({"param": value.clone(), "cat_dim": 0}, folder / "zero" / name / "fp32.pt")
    torch.save({}, folder / "zero" / "optimizer_state.pt")
    out = export_checkpoint.checkpoint_state_dict(str(tmp_path), folder.name, config)
    assert sorted(out) == sorted(state)
    for key in state:
        assert torch.equal(out[key], state[key]), key


def test_zero0_fp32_checkpoint_to_universal_is_one_clear_line(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "global_step2"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, folder / "mp_rank_00_model_states.pt")
    (folder.parent / "latest").write_text("global_step2")
    r = tool("convert_checkpoint.py", tmp_path / "run", "--to", "universal", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "needs no conversion: rerun the stage with the new number of ranks" in r.stderr


def test_run_paths_resolve_from_another_folder(tmp_path, monkeypatch):
    """args.json keeps paths as the stage got them (relative to where it was launched)."""
    project = tmp_path / "project"
    (project / "build" / "data").mkdir(parents=True)
    run = project / "runs" / "a"
    run.mkdir(parents=True)
    run_args = {"output": "runs/a", "data": ["build/data"], "model": "tiny", "objective": "clm"}
    monkeypatch.chdir(tmp_path)
    # from the launch folder (the run's path minus args.json's relative output)
    assert export_checkpoint.run_path(str(run), run_args, "build/data", "data", "--tokenizer") == \
        str(project / "build" / "data")
    # a moved run (output no longer ends its path): from a folder above it
    moved = project / "elsewhere" / "a"
    moved.mkdir(parents=True)
    assert export_checkpoint.run_path(str(moved), run_args, "build/data", "data", "--tokenizer") == \
        str(project / "build" / "data")
    # not found anywhere: the error names the path and the flag
    with pytest.raises(FileNotFoundError, match=r"the run's data 'build/nodata' is not there.*--tokenizer PATH"):
        export_checkpoint.run_path(str(run), run_args, "build/nodata", "data", "--tokenizer")


def test_finetune_runs_are_refused_with_where_their_export_is(tmp_path):
    run = tmp_path / "ft"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"task": "classify", "init": "runs/tiny/hf", "output": "ft"}))
    r = tool("export_checkpoint.py", run, check=False)
    assert r.returncode == 2 and "exports pipeline.pretrain runs" in r.stderr and f"{run}/hf" in r.stderr
