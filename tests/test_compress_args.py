"""compress's flags (unit): --task from the data flags when left out, --unseen-labels, the default --max-length."""
import json

import pytest

from pipeline import compress
from pipeline.cli import parse

BASE = ["--init", "runs/x/hf", "--deepspeed_config", "ds_configs/compression/int8_ptq.json"]


def checked(tmp_path, *flags):
    args = parse(compress.Args, [*BASE, "--output", str(tmp_path / "run"), *flags], "")
    compress.check_args(args)
    return args


@pytest.mark.parametrize("flags, task", [
    (["--train", "t.jsonl", "--valid", "v.jsonl", "--test", "s.jsonl", "--text-key", "body"], "classify"),
    (["--data", "data"], "lm"),
    (["--task", "classify", "--train", "t.jsonl", "--valid", "v.jsonl"], "classify"),
    (["--task", "lm", "--data", "data"], "lm"),
])
def test_task_follows_the_data_flags(tmp_path, flags, task):
    assert checked(tmp_path, *flags).task == task


@pytest.mark.parametrize("flags, message", [
    ([], "--task lm needs --data"),
    (["--test", "s.jsonl"], "--task classify needs --train F and --valid F"),
    (["--data", "data", "--train", "t.jsonl"], "--train does not apply to --task lm"),
])
def test_incomplete_or_mixed_flags_are_errors(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        checked(tmp_path, *flags)


def test_unseen_labels_applies_to_classify_only(tmp_path):
    assert checked(tmp_path, "--train", "t.jsonl", "--valid", "v.jsonl", "--unseen-labels", "drop").unseen_labels == "drop"
    with pytest.raises(ValueError, match="--unseen-labels applies to --task classify only"):
        checked(tmp_path, "--data", "data", "--unseen-labels", "drop")


def write_model_folder(folder, model_max_length, **config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": model_max_length}))
    return str(folder)


def test_max_length_defaults_to_the_one_the_classifier_was_finetuned_with(tmp_path):
    # pipeline.finetune exports the tokenizer with model_max_length = its --max-length.
    assert compress.finetuned_max_length(write_model_folder(tmp_path / "a", 96, max_position_embeddings=128)) == 96
    assert compress.finetuned_max_length(write_model_folder(tmp_path / "b", 64, n_positions=256)) == 64
    # transformers' "no limit" (about 1e30), a length beyond the model's positions, a folder without a tokenizer.
    assert compress.finetuned_max_length(write_model_folder(tmp_path / "c", int(1e30), max_position_embeddings=128)) is None
    assert compress.finetuned_max_length(write_model_folder(tmp_path / "d", 512, max_position_embeddings=128)) is None
    assert compress.finetuned_max_length(str(tmp_path)) is None
