"""tools/estimate_memory.py: ZeRO divides model states across ranks, checkpointing shrinks activations."""
import os
import sys

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import estimate_memory  # noqa: E402


def test_memory_rows_follow_the_zero_arithmetic(capsys):
    rows = {r["config"]: r for r in estimate_memory.main(["--model", "llama-125m", "--gpus-per-node", "4",
                                                         "--seq-length", "1024", "--gpu-memory", "80"])}
    total, _, _ = estimate_memory.count_params("llama-125m", 32000)
    assert rows["zero0"]["states"] == 16 * total
    assert rows["zero1"]["states"] == 4 * total + 3 * total  # 12 bytes / 4 ranks
    assert rows["zero3"]["states"] < rows["zero2"]["states"] < rows["zero1"]["states"] < rows["zero0"]["states"]
    assert rows["zero3_offload"]["states"] < rows["zero3"]["states"]
    assert rows["zero0 + act. ckpt"]["activations"] < rows["zero0"]["activations"]
    assert "pick: zero0" in capsys.readouterr().out  # 125M fits an 80 GiB GPU without partitioning


def test_nothing_fits_says_so(capsys):
    estimate_memory.main(["--model", "llama-1b", "--gpu-memory", "1", "--seq-length", "2048"])
    assert "nothing fits" in capsys.readouterr().out
