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
