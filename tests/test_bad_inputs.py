"""Bad input to every stage and tool: a non-zero exit with one message naming the flag or the file (and line),
and no output that looks complete. Each case runs the module's real `__main__` in this process (runpy): the
errors come before any process group starts, so the whole matrix takes seconds."""
import json
import os
import shutil

import pytest

from tests.conftest import REPO, run_as_main

SENTIMENT = os.path.join(REPO, "data", "sentiment")
ZERO0 = os.path.join(REPO, "ds_configs", "zero0.json")
PTQ = os.path.join(REPO, "ds_configs", "compression", "int8_ptq.json")
COMPLETE = ("summary.json", "hf", "manifest.json")  # what marks a finished run or data folder


@pytest.fixture(scope="module")
def files(tmp_path_factory, prepared):
    """Bad (and a few good) input files, and a tiny classifier exported as a run's hf/ folder."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pipeline.data.tokenizer import Tokenizer
    from pipeline.export import save_hf

    w = tmp_path_factory.mktemp("bad_inputs")

    def write(name, text):
        (w / name).write_text(text, encoding="utf-8")
        return str(w / name)

    tokenizer = Tokenizer.load(prepared)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                         id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    save_hf(LlamaForSequenceClassification(config), tokenizer, str(w / "classifier"))
    truncated = w / "truncated_data"
    shutil.copytree(prepared, truncated)
    os.truncate(truncated / "valid.bin", 10)
    os.makedirs(w / "run_without_args" / "checkpoints")
    os.makedirs(w / "run_bad_args" / "checkpoints" / "global_step1")
    write("run_bad_args/args.json", "{not json")
    os.makedirs(w / "run_without_checkpoint")
    write("run_without_checkpoint/args.json", json.dumps({"data": [prepared], "model": "tiny", "objective": "clm"}))
    os.makedirs(w / "not_a_model")
    os.makedirs(w / "bad_model_config")
    write("bad_model_config/config.json", "{nope")
    compression = json.load(open(PTQ))
    compression["compression"]["weight_quantization"] = {"bogus": 1}
    return {
        "w": str(w), "data": prepared, "truncated": str(truncated), "classifier": str(w / "classifier"),
        "good": write("good.jsonl", '{"text": "a fine day", "label": "positive"}\n'),
        "bad": write("bad.jsonl", '{"text": "ok", "label": "positive"}\nnot json\n'),
        "nolabel": write("nolabel.jsonl", '{"text": "ok", "label": "positive"}\n{"text": "no label here"}\n'),
        "array": write("array.jsonl", '{"text": "ok", "label": "positive"}\n[1, 2]\n'),
        "unseen": write("unseen.jsonl", '{"text": "ok", "label": "neutral"}\n'),
        "xyz": write("input.xyz", "some text"),
        "afile": write("afile", "a file, not a folder"),
        "badjson": write("bad.json", '{\n  "train_batch_size": 4,\n}\n'),
        "contradicting": write("contradicting.json", json.dumps(
            {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})),
        "list": write("list.json", "[1, 2]"),
        "duplicate": write("duplicate.json", '{"train_batch_size": 4, "train_batch_size": 8}'),
        "badmodel": write("model.json", '{"model_type": "llama", "hidden_size": }'),
        "zerovocab": write("zerovocab.json", json.dumps({"model_type": "llama", "vocab_size": 0})),
        "badcompression": write("badcompression.json", json.dumps(compression)),
        "hosts": write("hosts", "node-a slots=2\nnode-b slots=two\n"),
        "evilhosts": write("evilhosts", "node-a;reboot slots=2\n-oProxyCommand=x slots=1\n"),
    }


# (case, module, argv, what the one error line must name). Placeholders: {out} a fresh output path, the rest
# from the `files` fixture.
CASES = [
    # prepare
    ("prepare: missing input", "pipeline.prepare", ["--input", "{w}/nope.jsonl", "--output", "{out}", "--vocab-size", "400"],
     ["{w}/nope.jsonl: no such file"]),
    ("prepare: unknown format", "pipeline.prepare", ["--input", "{xyz}", "--output", "{out}", "--vocab-size", "400"],
     ["{xyz}: unknown extension '.xyz'"]),
    ("prepare: malformed jsonl line", "pipeline.prepare", ["--input", "{bad}", "--output", "{out}", "--vocab-size", "400"],
     ["{bad}:2: malformed JSON"]),
    ("prepare: missing text key", "pipeline.prepare",
     ["--input", "{good}", "--output", "{out}", "--vocab-size", "400", "--text-key", "body"], ["{good}:1: no key 'body'"]),
    ("prepare: zero vocab", "pipeline.prepare", ["--input", "{good}", "--output", "{out}", "--vocab-size", "0"],
     ["--vocab-size 0 is too small"]),
    ("prepare: vocab not a number", "pipeline.prepare", ["--input", "{good}", "--output", "{out}", "--vocab-size", "ten"],
     ["argument --vocab-size: invalid int value: 'ten'"]),
    ("prepare: output is a file", "pipeline.prepare", ["--input", "{good}", "--output", "{afile}", "--vocab-size", "400"],
     ["{afile}: exists and is not a folder"]),
    ("prepare: fractions leave no train", "pipeline.prepare",
     ["--input", "{good}", "--output", "{out}", "--vocab-size", "400", "--valid-fraction", "0.6", "--test-fraction", "0.5"],
     ["--valid-fraction 0.6 and --test-fraction 0.5"]),
    ("prepare: zero workers", "pipeline.prepare", ["--input", "{good}", "--output", "{out}", "--vocab-size", "400",
                                                   "--workers", "0"], ["--workers"]),
    ("prepare: missing tokenizer", "pipeline.prepare", ["--input", "{good}", "--output", "{out}", "--tokenizer", "{w}/nope"],
     ["{w}/nope: no such tokenizer"]),
    ("prepare: tokenizer not SentencePiece", "pipeline.prepare",
     ["--input", "{good}", "--output", "{out}", "--tokenizer", "{afile}"], ["{afile}: not a SentencePiece model"]),
    # pretrain
    ("pretrain: negative steps", "pipeline.pretrain",
     ["--data", "{data}", "--deepspeed_config", ZERO0, "--output", "{out}", "--train-steps", "-1"],
     ["--train-steps must be positive, got -1"]),
    ("pretrain: steps not a number", "pipeline.pretrain",
     ["--data", "{data}", "--deepspeed_config", ZERO0, "--output", "{out}", "--train-steps", "ten"],
     ["argument --train-steps: invalid int value"]),
    ("pretrain: zero sequence length", "pipeline.pretrain",
     ["--data", "{data}", "--deepspeed_config", ZERO0, "--output", "{out}", "--train-steps", "1", "--seq-length", "0"],
     ["--seq-length must be positive"]),
    ("pretrain: missing data folder", "pipeline.pretrain",
     ["--data", "{w}/nodata", "--deepspeed_config", ZERO0, "--output", "{out}", "--train-steps", "1"],
     ["--data {w}/nodata: no such folder; prepare it first"]),
    ("pretrain: damaged data", "pipeline.pretrain",
     ["--data", "{truncated}", "--deepspeed_config", ZERO0, "--output", "{out}", "--train-steps", "1"],
     ["{truncated}/valid.bin: 10 bytes", "--overwrite"]),
    ("pretrain: missing DeepSpeed JSON", "pipeline.pretrain",
     ["--data", "{data}", "--deepspeed_config", "{w}/no.json", "--output", "{out}", "--train-steps", "1"],
     ["DeepSpeed config not found: {w}/no.json"]),
    ("pretrain: invalid DeepSpeed JSON", "pipeline.pretrain",
     ["--data", "{data}", "--deepspeed_config", "{badjson}", "--output", "{out}", "--train-steps", "1"],
     ["{badjson}:3:1: invalid JSON"]),
    ("pretrain: contradicting batch sizes", "pipeline.pretrain",
     ["--data", "{data}", "--deepspeed_config", "{contradicting}", "--output", "{out}", "--train-steps", "1"],
     ["{contradicting}: train_batch_size 32 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2"]),
    ("pretrain: DeepSpeed JSON not an object", "pipeline.pretrain",
     ["--data", "{data}", "--deepspeed_config", "{list}", "--output", "{out}", "--train-steps", "1"],
     ["{list}: a DeepSpeed config is a JSON object"]),
    ("pretrain: duplicate key", "pipeline.pretrain",
     ["--data", "{data}", "--deepspeed_config", "{duplicate}", "--output", "{out}", "--train-steps", "1"],
     ["{duplicate}: duplicate key 'train_batch_size'"]),
    ("pretrain: unknown preset", "pipeline.pretrain",
     ["--data", "{data}", "--model", "llama-7z", "--deepspeed_config", ZERO0, "--output", "{out}", "--train-steps", "1"],
     ["--model 'llama-7z': not a preset"]),
    ("pretrain: invalid model JSON", "pipeline.pretrain",
     ["--data", "{data}", "--model", "{badmodel}", "--deepspeed_config", ZERO0, "--output", "{out}", "--train-steps", "1"],
     ["{badmodel}:1:"]),
    ("pretrain: zero vocab in model JSON", "pipeline.pretrain",
     ["--data", "{data}", "--model", "{zerovocab}", "--deepspeed_config", ZERO0, "--output", "{out}", "--train-steps", "1"],
     ["--model {zerovocab}: vocab_size 0 is smaller"]),
    ("pretrain: output is a file", "pipeline.pretrain",
     ["--data", "{data}", "--deepspeed_config", ZERO0, "--output", "{afile}", "--train-steps", "1"],
     ["--output {afile}: exists and is not a folder"]),
    ("pretrain: data weights do not match", "pipeline.pretrain",
     ["--data", "{data}", "--deepspeed_config", ZERO0, "--output", "{out}", "--train-steps", "1", "--data-weights", "1", "2"],
     ["--data-weights has 2 values for 1 --data folders"]),
    # finetune
    ("finetune: missing train file", "pipeline.finetune",
     ["--train", "{w}/no.jsonl", "--valid", "{good}", "--init", "{classifier}", "--deepspeed_config", ZERO0,
      "--output", "{out}"], ["--train {w}/no.jsonl: no such file"]),
    ("finetune: malformed jsonl line", "pipeline.finetune",
     ["--train", "{bad}", "--valid", "{good}", "--init", "{classifier}", "--deepspeed_config", ZERO0, "--output", "{out}"],
     ["{bad}:2: malformed JSON"]),
    ("finetune: missing label key", "pipeline.finetune",
     ["--train", "{nolabel}", "--valid", "{good}", "--init", "{classifier}", "--deepspeed_config", ZERO0,
      "--output", "{out}"], ["{nolabel}:2: no key 'label'"]),
    ("finetune: a line that is not an object", "pipeline.finetune",
     ["--train", "{array}", "--valid", "{good}", "--init", "{classifier}", "--deepspeed_config", ZERO0,
      "--output", "{out}"], ["{array}:2: a JSON list"]),
    ("finetune: label not in training data", "pipeline.finetune",
     ["--train", SENTIMENT + "/train.jsonl", "--valid", "{unseen}", "--init", "{classifier}", "--deepspeed_config", ZERO0,
      "--output", "{out}"], ["{unseen}:1: label 'neutral' does not occur"]),
    ("finetune: init without config.json", "pipeline.finetune",
     ["--train", "{good}", "--valid", "{good}", "--init", "{w}/not_a_model", "--deepspeed_config", ZERO0,
      "--output", "{out}"], ["--init {w}/not_a_model: no config.json"]),
    ("finetune: init config not JSON", "pipeline.finetune",
     ["--train", "{good}", "--valid", "{good}", "--init", "{w}/bad_model_config", "--deepspeed_config", ZERO0,
      "--output", "{out}"], ["{w}/bad_model_config/config.json"]),
    ("finetune: epochs and steps", "pipeline.finetune",
     ["--train", "{good}", "--valid", "{good}", "--init", "{classifier}", "--deepspeed_config", ZERO0, "--output", "{out}",
      "--epochs", "1", "--train-steps", "3"], ["--train-steps and --epochs are exclusive"]),
    ("finetune: negative max length", "pipeline.finetune",
     ["--train", "{good}", "--valid", "{good}", "--init", "{classifier}", "--deepspeed_config", ZERO0, "--output", "{out}",
      "--max-length", "-3"], ["--max-length must be positive"]),
    ("finetune: invalid DeepSpeed JSON", "pipeline.finetune",
     ["--train", SENTIMENT + "/train.jsonl", "--valid", SENTIMENT + "/valid.jsonl", "--init", "{classifier}",
      "--deepspeed_config", "{badjson}", "--output", "{out}"], ["{badjson}:3:1: invalid JSON"]),
    ("finetune: output is a file", "pipeline.finetune",
     ["--train", "{good}", "--valid", "{good}", "--init", "{classifier}", "--deepspeed_config", ZERO0, "--output", "{afile}"],
     ["--output {afile}: exists and is not a folder"]),
    # compress
    ("compress: config without compression block", "pipeline.compress",
     ["--init", "{classifier}", "--task", "classify", "--train", "{good}", "--valid", "{good}", "--deepspeed_config",
      ZERO0, "--output", "{out}"], [ZERO0 + ' has no "compression" block']),
    ("compress: unknown compression key", "pipeline.compress",
     ["--init", "{classifier}", "--data", "{data}", "--deepspeed_config", "{badcompression}", "--output", "{out}"],
     ["{badcompression}: compression.weight_quantization: unknown key 'bogus'"]),
    ("compress: lm without data", "pipeline.compress",
     ["--init", "{classifier}", "--deepspeed_config", PTQ, "--output", "{out}"], ["--task lm needs --data"]),
    ("compress: negative steps", "pipeline.compress",
     ["--init", "{classifier}", "--data", "{data}", "--deepspeed_config", PTQ, "--output", "{out}", "--train-steps", "-5"],
     ["--train-steps must be 0 or positive"]),
    ("compress: data flag for classify", "pipeline.compress",
     ["--init", "{classifier}", "--task", "classify", "--data", "{data}", "--train", "{good}", "--valid", "{good}",
      "--deepspeed_config", PTQ, "--output", "{out}"], ["--data does not apply to --task classify"]),
    ("compress: damaged data", "pipeline.compress",
     ["--init", "{classifier}", "--data", "{truncated}", "--deepspeed_config", PTQ, "--output", "{out}"],
     ["{truncated}/valid.bin: 10 bytes"]),
    # predict
    ("predict: model without config.json", "pipeline.predict", ["--model", "{w}/not_a_model", "--input", "{good}"],
     ["--model {w}/not_a_model: no config.json"]),
    ("predict: missing input", "pipeline.predict", ["--model", "{classifier}", "--input", "{w}/no.jsonl"],
     ["--input {w}/no.jsonl: no such file"]),
    ("predict: zero batch size", "pipeline.predict", ["--model", "{classifier}", "--input", "{good}", "--batch-size", "0"],
     ["--batch-size"]),
    ("predict: malformed line after the first batch", "pipeline.predict",
     ["--model", "{classifier}", "--input", "{bad}", "--batch-size", "1", "--output", "{out}"], ["{bad}:2: malformed JSON"]),
    ("predict: output is a folder", "pipeline.predict", ["--model", "{classifier}", "--input", "{good}", "--output", "{w}"],
     ["--output {w}: is a folder"]),
    # tools
    ("export_checkpoint: no args.json", "tools/export_checkpoint.py", ["{w}/run_without_args", "--output", "{out}"],
     ["{w}/run_without_args/args.json: missing"]),
    ("export_checkpoint: args.json not JSON", "tools/export_checkpoint.py", ["{w}/run_bad_args", "--output", "{out}"],
     ["{w}/run_bad_args/args.json:1:2: not valid JSON"]),
    ("export_checkpoint: no checkpoint", "tools/export_checkpoint.py", ["{w}/run_without_checkpoint", "--output", "{out}"],
     ["{w}/run_without_checkpoint/checkpoints: no checkpoint"]),
    ("convert_checkpoint: no checkpoint", "tools/convert_checkpoint.py", ["{w}/run_without_checkpoint", "--to", "universal"],
     ["{w}/run_without_checkpoint/checkpoints: no checkpoint"]),
    ("convert_checkpoint: unknown target", "tools/convert_checkpoint.py", ["{w}/run_without_checkpoint", "--to", "onnx"],
     ["argument --to: invalid choice: 'onnx'"]),
    ("check_hostfile: missing hostfile", "tools/check_hostfile.py", ["{w}/no_hosts"], ["{w}/no_hosts: No such file"]),
    ("check_hostfile: malformed line", "tools/check_hostfile.py", ["{hosts}"], ["{hosts}:2: 'node-b slots=two'"]),
    ("check_hostfile: host names with shell metacharacters", "tools/check_hostfile.py", ["{evilhosts}"],
     ["{evilhosts}:1: 'node-a;reboot' is not a host name", "{evilhosts}:2: '-oProxyCommand=x' is not a host name"]),
    ("check_hostfile: port out of range", "tools/check_hostfile.py", ["{hosts}", "--master-port", "70000"],
     ["--master-port 70000"]),
    ("inspect_data: missing folder", "tools/inspect_data.py", ["{w}/nodata"], ["{w}/nodata: no such folder"]),
    ("inspect_data: damaged data", "tools/inspect_data.py", ["{truncated}"], ["{truncated}/valid.bin: 10 bytes"]),
    ("estimate_memory: unknown preset", "tools/estimate_memory.py", ["--model", "llama-7z"],
     ["--model 'llama-7z': not a preset"]),
    ("estimate_memory: negative sequence length", "tools/estimate_memory.py", ["--model", "tiny", "--seq-length", "-1"],
     ["--seq-length must be positive, got -1"]),
]


def test_the_matrix_covers_every_stage_and_tool():
    targets = {module for _, module, _, _ in CASES}
    assert len(CASES) >= 30
    assert targets >= {"pipeline.prepare", "pipeline.pretrain", "pipeline.finetune", "pipeline.compress",
                       "pipeline.predict", "tools/export_checkpoint.py", "tools/convert_checkpoint.py",
                       "tools/check_hostfile.py"}


@pytest.mark.parametrize("case, module, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(case, module, argv, expected, files, tmp_path, monkeypatch, capsys):
    paths = {**files, "out": str(tmp_path / "out")}
    code = run_as_main(module, [a.format(**paths) for a in argv], monkeypatch)
    err = capsys.readouterr().err
    assert code != 0, f"{case}: exit status 0\n{err}"
    assert "Traceback" not in err, err
    for text in expected:
        assert text.format(**paths) in err, f"{case}: expected {text.format(**paths)!r} in:\n{err}"
    out = tmp_path / "out"
    # Nothing that looks complete: no finished run or data folder, no predictions file.
    assert not out.is_file(), f"{case}: left {out}"
    assert not any((out / name).exists() for name in COMPLETE), f"{case}: left {os.listdir(out)}"
    left = [name for name in os.listdir(tmp_path) if name != "out"]  # e.g. prepare's .out.*.tmp, predict's out.tmp
    assert not left, f"{case}: left {left}"
