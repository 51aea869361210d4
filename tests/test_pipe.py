"""Pipeline parallelism end to end on CPU under the real deepspeed launcher: a 2-stage run matches a
1-stage run from the same initial weights, 2 stages x 2 replicas train on 4 ranks, bf16 + ZeRO-1
trains, resume is exact, and the export is the plain run's HF format.
(The fast checks without a launcher are in test_pipe_layers.py.)"""
import json
import os

import numpy as np
import pytest

from tests.conftest import REPO, fp32_args, run_as_main, run_stage, scalars

pytestmark = pytest.mark.slow
STEPS = 12
EQUIV_STEPS = 6


def make_config(tmp_path, name, base, fp32=False, pipeline=None, **top):
    """A shipped config with a learning rate for a tiny model on a dozen steps and a fixed schedule
    (so that a run stopped early resumes on the same one), optionally in fp32 or with another
    pipeline block / batch layout."""
    ds = json.load(open(os.path.join(REPO, "ds_configs", base)))
    ds["optimizer"]["params"]["lr"] = 3e-3
    ds["scheduler"]["params"].update(total_num_steps=STEPS, warmup_num_steps=2)
    if fp32:
        ds["bf16"] = {"enabled": False}
    if pipeline is not None:
        ds["pipeline"] = {**ds.get("pipeline", {}), **pipeline}
    ds.update(top)
    path = tmp_path / name
    path.write_text(json.dumps(ds))
    return str(path)


def pretrain(prepared, run, config, ranks=2, steps=STEPS, extra=()):
    args = ["--data", prepared, "--model", "tiny", "--deepspeed_config", config, "--output", str(run),
            "--train-steps", str(steps), "--seq-length", "64", "--log-interval", "1", "--eval-interval", "6",
            "--eval-batches", "2", "--save-interval", "6", "--seed", "3", *extra]
    return run_stage("pretrain.py", args, ranks=ranks)


def losses(run):
    return [v for _, v in sorted(scalars(run, "Train/loss").items())]


def our_tags(run):
    """The TensorBoard tags the stage writes (DeepSpeed's own Train/Samples/* left aside: its pipeline
    engine adds train_loss/eval_loss there)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t for t in acc.Tags()["scalars"] if not t.startswith("Train/Samples/")}


@pytest.fixture(scope="module")
def pipe_run(prepared, tmp_path_factory):
    """pipe2.json as shipped (bf16, ZeRO-1, 2 stages) on 2 ranks, 12 steps."""
    root = tmp_path_factory.mktemp("pipe")
    pretrain(prepared, root / "pipe2", make_config(root, "pipe2.json", "pipe2.json"))
    return root / "pipe2"


def test_bf16_zero1_pipeline_trains_and_writes_the_run_folder(pipe_run):
    summary = json.load(open(pipe_run / "summary.json"))
    assert summary["pipeline_stages"] == 2 and summary["world_size"] == 2 and summary["zero_stage"] == 1
    assert summary["precision"] == "bf16" and summary["steps"] == STEPS and summary["tokens_per_sec"] > 0
    curve = losses(pipe_run)
    assert len(curve) == STEPS and curve[-1] < curve[0] - 0.5  # the loss falls
    assert abs(summary["train_loss"] - curve[-1]) < 1e-6
    assert {"Train/loss", "Train/lr", "Train/grad_norm", "Train/tokens_per_sec", "Eval/loss", "Eval/ppl"} <= our_tags(pipe_run)
    assert all(v > 0 for v in scalars(pipe_run, "Train/grad_norm").values())
    tags = sorted(d for d in os.listdir(pipe_run / "checkpoints") if not d.endswith(".py"))
    assert tags == ["global_step12", "global_step6", "latest"]
    files = os.listdir(pipe_run / "checkpoints" / "global_step12")
    assert "layer_00-model_states.pt" in files and "mp_rank_01_model_states.pt" in files


def test_pipe2_fp16_runs_as_bf16_with_bf16_gradients_on_cpu(prepared, tmp_path):
    # Without data_types DeepSpeed takes its ZeRO-1 optimizer (bf16 gradients) instead of the BF16
    # optimizer that pipe2.json selects: the other bf16 + ZeRO-1 + pipeline combination.
    r = pretrain(prepared, tmp_path / "fp16", make_config(tmp_path, "pipe2_fp16.json", "pipe2_fp16.json"), steps=6,
                 extra=["--eval-interval", "0", "--save-interval", "3"])
    assert "fp16" in r.stderr and "bf16" in r.stderr
    summary = json.load(open(tmp_path / "fp16" / "summary.json"))
    assert summary["precision"] == "bf16" and summary["pipeline_stages"] == 2 and summary["zero_stage"] == 1
    curve = losses(tmp_path / "fp16")
    assert len(curve) == 6 and curve[-1] < curve[0]


def fp32_pipe_run(prepared, run, config, ranks=2, extra=()):
    """A pipelined run to compare with the plain one, tests/conftest.py fp32_zero2_run (ZeRO-2 data parallel on 2
    ranks, global batch micro 4 x accumulation 1 x dp 2 = 8, evaluation over 1 x 4 x 2 = 8 windows every 4 steps):
    its flags and schedule, EQUIV_STEPS steps."""
    args = fp32_args(prepared, config, run, steps=EQUIV_STEPS)
    run_stage("pretrain.py", [*args, "--save-interval", "0", *extra], ranks=ranks)


def eval_loss_at_4(run):
    return scalars(run, "Eval/loss")[4]


def test_two_stages_match_one_stage_from_the_same_weights(fp32_zero2_run, prepared, tmp_path):
    # fp32 so that only reduction order differs. Global batch 8 both ways: 2 stages x micro 4 x accum 2
    # x dp 1 (pipe2.json's layout), and the plain run's micro 4 x accum 1 x dp 2. Evaluation (step 4) over
    # the same 8 windows: eval_batches x micro x dp = 2 x 4 x 1 = 1 x 4 x 2.
    pipe = tmp_path / "pipe"
    fp32_pipe_run(prepared, pipe, make_config(tmp_path, "pipe2.json", "pipe2.json", fp32=True),
                  extra=["--eval-batches", "2"])
    runs = {"plain": fp32_zero2_run, "pipe": pipe}
    curves = {name: losses(run)[:EQUIV_STEPS] for name, run in runs.items()}
    evals = {name: eval_loss_at_4(run) for name, run in runs.items()}
    assert len(losses(pipe)) == EQUIV_STEPS
    for curve in curves.values():
        assert curve[-1] < curve[0]
    print("curves", json.dumps(curves), "eval", json.dumps(evals))
    assert curves["pipe"][0] == pytest.approx(curves["plain"][0], abs=1e-5), curves
    assert curves["pipe"] == pytest.approx(curves["plain"], abs=1e-4), curves
    assert evals["pipe"] == pytest.approx(evals["plain"], abs=1e-4), evals
    norms = {name: [v for _, v in sorted(scalars(run, "Train/grad_norm").items())][:EQUIV_STEPS]
             for name, run in runs.items()}
    assert norms["pipe"] == pytest.approx(norms["plain"], rel=1e-4), norms
    assert our_tags(pipe) == our_tags(fp32_zero2_run)  # the same metrics


def test_two_stages_by_two_replicas_on_four_ranks(fp32_zero2_run, prepared, tmp_path):
    # 2 stages x 2 data-parallel replicas: global batch micro 2 x accum 2 x dp 2 = 8, the same as the
    # plain run's micro 4 x dp 2; in fp32 the curves agree, which checks that each replica reads its own
    # slice of the data (rank and size from the pipeline grid, not the global rank).
    # The pipeline also partitions by layer type and checkpoints activations in chunks of 2 layers,
    # the token embedding inside the first checkpointed chunk of stage 0.
    pipe = make_config(tmp_path, "pipe2.json", "pipe2.json", fp32=True, train_micro_batch_size_per_gpu=2,
                       pipeline={"partition": "type:DecoderLayer", "activation_checkpoint_interval": 2})
    fp32_pipe_run(prepared, tmp_path / "pipe", pipe, ranks=4, extra=["--eval-batches", "2"])  # 2 x 2 x 2 windows
    summary = json.load(open(tmp_path / "pipe" / "summary.json"))
    assert summary["world_size"] == 4 and summary["pipeline_stages"] == 2 and summary["train_batch_size"] == 8
    curve = losses(tmp_path / "pipe")
    assert len(curve) == EQUIV_STEPS and curve[-1] < curve[0]
    assert curve == pytest.approx(losses(fp32_zero2_run)[:EQUIV_STEPS], abs=1e-3)
    assert eval_loss_at_4(tmp_path / "pipe") == pytest.approx(eval_loss_at_4(fp32_zero2_run), abs=1e-3)


def test_resume_continues_the_uninterrupted_pipeline_run(pipe_run, prepared, tmp_path):
    # A run stopped after its checkpoint of step 6 (pipe_run's, copied: layer files, optimizer states, data
    # position, RNG states) resumes to exactly the uninterrupted run's steps 7-12 and evaluation.
    import shutil

    part = tmp_path / "part"
    shutil.copytree(pipe_run / "checkpoints" / "global_step6", part / "checkpoints" / "global_step6")
    (part / "checkpoints" / "latest").write_text("global_step6")
    r = pretrain(prepared, part, make_config(tmp_path, "pipe2.json", "pipe2.json"))
    assert "resumed from" in r.stdout and "at step 6" in r.stdout
    assert sorted(scalars(part, "Train/loss")) == list(range(7, STEPS + 1))
    assert losses(part) == pytest.approx(losses(pipe_run)[6:], abs=1e-6)
    assert json.load(open(part / "summary.json"))["eval_loss"] == pytest.approx(
        json.load(open(pipe_run / "summary.json"))["eval_loss"], abs=1e-6)


def eval_windows(prepared, n):
    import torch

    from pipeline.data import TokenShards
    from pipeline.data.packing import PackedWindows

    windows = PackedWindows(TokenShards(prepared, "valid"), 64, eos_id=3)
    return torch.from_numpy(np.stack([windows[k] for k in range(min(len(windows), n))]))


def test_export_is_the_plain_hf_format_and_reproduces_the_eval_loss(pipe_run, prepared):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    summary = json.load(open(pipe_run / "summary.json"))
    model = AutoModelForCausalLM.from_pretrained(pipe_run / "hf").eval()
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    with safe_open(str(pipe_run / "hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    reference = build_reference_names()
    assert names == reference
    ids = eval_windows(prepared, 2 * 4 * 1)  # eval_batches x micro x data-parallel replicas, as the run evaluated
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss == pytest.approx(summary["eval_loss"], rel=5e-3)


def build_reference_names():
    """The tensor names a non-pipeline run of the same model saves."""
    import tempfile

    from safetensors import safe_open

    from pipeline.export import save_hf
    from pipeline.models import build_model

    model = build_model("tiny", "clm", 1000, {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3})
    with tempfile.TemporaryDirectory() as d:
        save_hf(model, None, os.path.join(d, "hf"))
        with safe_open(os.path.join(d, "hf", "model.safetensors"), "pt") as f:
            return set(f.keys())


def test_export_tool_reads_pipeline_layer_files(pipe_run, tmp_path, monkeypatch):
    # The tool's __main__ in this process (its command line in a subprocess: tests/test_convert_checkpoint.py).
    import torch
    from transformers import AutoModelForCausalLM

    assert run_as_main("tools/export_checkpoint.py", [str(pipe_run), "--output", str(tmp_path / "step12")],
                       monkeypatch) == 0
    assert run_as_main("tools/export_checkpoint.py", [str(pipe_run), "--tag", "global_step6", "--output",
                                                      str(tmp_path / "step6")], monkeypatch) == 0
    ids = torch.arange(64).reshape(1, 64) + 10
    with torch.no_grad():
        logits = {p.name: AutoModelForCausalLM.from_pretrained(p).float()(input_ids=ids).logits
                  for p in (tmp_path / "step12", tmp_path / "step6", pipe_run / "hf")}
    # The layer files hold the module weights (bf16 here), exactly what the run's own export holds.
    assert torch.allclose(logits["step12"], logits["hf"], atol=1e-5)
    assert not torch.allclose(logits["step6"], logits["step12"], atol=0.1)
