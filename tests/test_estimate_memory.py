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


def test_config_json_and_hf_folder_use_their_own_vocabulary(tmp_path, capsys):
    """A config JSON or HF folder names its vocabulary (here 1000, not the presets' default 32000)."""
    import json

    from transformers import AutoConfig

    spec = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    AutoConfig.for_model(**spec).save_pretrained(tmp_path / "hf")
    # 2 embeddings of 1000 x 64 + 2 layers of (4 x 64 x 64 attention + 3 x 64 x 128 MLP + 2 x 64 norms) + 64 norm
    expected = 2 * 1000 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    for model in (str(tmp_path / "config.json"), str(tmp_path / "hf")):
        total, _, config = estimate_memory.count_params(model)
        assert config.vocab_size == 1000 and total == expected, model
        estimate_memory.main(["--model", model, "--seq-length", "128"])
        out = capsys.readouterr().out
        assert "vocab 1000" in out and "pick: zero0 (fits in 85% of 80 GiB): ds_configs/zero0.json" in out
    assert estimate_memory.count_params("tiny")[2].vocab_size == estimate_memory.DEFAULT_VOCAB
    assert estimate_memory.count_params(str(tmp_path / "hf"), 4000)[2].vocab_size == 4000  # --vocab-size replaces it
