"""tools/report.py: plots and a Markdown table from runs' TensorBoard events."""
import json
import os
import sys

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import report  # noqa: E402


def fake_run(folder, losses):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder / "tensorboard"))
    for step, loss in enumerate(losses, 1):
        writer.add_scalar("Train/loss", loss, step)
        writer.add_scalar("Train/lr", 1e-3, step)
    writer.add_scalar("Eval/loss", losses[-1] + 0.1, len(losses))
    writer.close()
    (folder / "summary.json").write_text(json.dumps({"steps": len(losses), "train_loss": losses[-1], "zero_stage": 2}))


def test_report_overlays_runs_and_tabulates_final_metrics(tmp_path):
    fake_run(tmp_path / "a", [5.0, 4.0, 3.5])
    fake_run(tmp_path / "b", [5.0, 4.5, 4.25])
    assert report.read_scalars(str(tmp_path / "a"))["Train/loss"] == [(1, 5.0), (2, 4.0), (3, 3.5)]
    path = report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "out")])
    text = open(path).read()
    assert "| a | 3 | 3.5 |" in text and "| b | 3 | 4.25 |" in text
    assert "![loss](loss.png)" in text and "![learning rate](lr.png)" in text
    assert "perplexity.png" not in text  # no Eval/ppl scalars: no empty plot
    for png in ("loss.png", "lr.png"):
        assert open(tmp_path / "out" / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_classifier_and_compress_metrics_and_unique_labels(tmp_path):
    """x/b/run and y/b/run keep apart; a finetune run's accuracy/macro F1 and a compress run's before/after
    numbers are in the report; columns no run has are left out."""
    for name in ("x", "y"):
        (tmp_path / name / "b").mkdir(parents=True)
        fake_run(tmp_path / name / "b" / "run", [5.0, 4.0])
    summary = json.loads((tmp_path / "y" / "b" / "run" / "summary.json").read_text())
    summary.update(valid_accuracy=0.75, test_macro_f1=0.5, bytes_before=400, bytes_after=100,
                   test_accuracy_before=0.8, test_accuracy_after=0.7)
    (tmp_path / "y" / "b" / "run" / "summary.json").write_text(json.dumps(summary))
    runs = [str(tmp_path / "x" / "b" / "run"), str(tmp_path / "y" / "b" / "run")]
    assert report.run_labels(runs) == {runs[0]: "x/b/run", runs[1]: "y/b/run"}
    text = open(report.main([*runs, "--output", str(tmp_path / "out")])).read()
    assert "| run | steps | train_loss | zero_stage | valid_accuracy | test_macro_f1 |" in text
    assert "| y/b/run | 2 | 4 | 2 | 0.75 | 0.5 |" in text and "| x/b/run | 2 | 4 | 2 |  |  |" in text
    assert "| y/b/run | bytes | 400 | 100 |" in text and "| y/b/run | test_accuracy | 0.8 | 0.7 |" in text
    assert report.run_labels(["runs/a"]) == {"runs/a": "a"}


def test_a_folder_without_tensorboard_is_one_line(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "report.py"), str(tmp_path), "--output",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"report: error: {tmp_path}/tensorboard: missing; is {tmp_path} a run folder?"
