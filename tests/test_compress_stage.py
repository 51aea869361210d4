"""End-to-end compression on CPU: `pipeline.compress` under the deepspeed launcher (2 gloo ranks) and as one
plain process, on tiny models: a language model on prepared shards and a BERT classifier on labelled jsonl."""
import json
import os
import random

import pytest

from tests.conftest import REPO, run_as_main, run_stage, scalars

pytestmark = pytest.mark.slow
STEPS = 12


def compression_config(name, tmp_path, fp32=True, **compression):
    """A shipped compression config with a learning rate and schedule for a tiny model on a dozen steps, optionally in
    fp32 (bf16 matmuls are slow on CPUs without bf16 units), with compression keys overridden."""
    ds = json.load(open(os.path.join(REPO, "ds_configs", "compression", name)))
    ds["optimizer"]["params"]["lr"] = 3e-3
    ds["scheduler"]["params"].update(total_num_steps="auto", warmup_num_steps="auto")  # the schedule spans the run
    if fp32:
        ds["bf16"] = {"enabled": False}
    for method, value in compression.items():
        ds["compression"][method] = value
    path = tmp_path / f"fast_{name}"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.fixture(scope="module")
def llama_init(prepared, tmp_path_factory):
    """A tiny Llama (4 layers, 64 wide) in HF format with the prepared data's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.data.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("llama_init")
    tok = Tokenizer.load(prepared)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=4, intermediate_size=128, max_position_embeddings=128,
                                  vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                                  eos_token_id=tok.eos_id, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_hf(str(out))
    return str(out)


WORDS = {"fruit": "apple pear plum cherry grape melon lemon peach".split(),
         "mineral": "stone rock brick metal iron steel marble granite".split()}
FILLER = "the a of and with very some big small old new red blue green over under".split()


@pytest.fixture(scope="module")
def classify_data(prepared, tmp_path_factory):
    """(train, valid, test) jsonl files of a separable two-label task, and a tiny BERT classifier (4 layers)
    trained on it (in process, as pipeline.finetune would), with the prepared data's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipeline.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("classify")
    rnd = random.Random(0)
    files = []
    for split, n in (("train", 160), ("valid", 48), ("test", 48)):
        path = root / f"{split}.jsonl"
        with open(path, "w") as f:
            for _ in range(n):
                label = rnd.choice(sorted(WORDS))
                words = [rnd.choice(FILLER) for _ in range(rnd.randint(3, 9))] + [rnd.choice(WORDS[label])] * 2
                rnd.shuffle(words)
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
        files.append(str(path))
    tok = Tokenizer.load(prepared)
    torch.manual_seed(0)
    labels = sorted(WORDS)
    config = AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=128, vocab_size=tok.vocab_size,
                                  pad_token_id=tok.pad_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  num_labels=2, id2label=dict(enumerate(labels)),
                                  label2id={n: i for i, n in enumerate(labels)})
    init = root / "init"
    tok.save_hf(str(init))
    model = AutoModelForSequenceClassification.from_config(config)
    _fit(model, str(init), files[0])
    model.save_pretrained(init)
    return (*files, str(init))


def _fit(model, tokenizer_dir, train_file, steps=60):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in open(train_file)]
    label = {n: i for i, n in model.config.id2label.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            chunk = [rows[(step * 16 + i) % len(rows)] for i in range(16)]
            batch = tok([r["text"] for r in chunk], padding=True, return_tensors="pt")
            out = model(**batch, labels=torch.tensor([label[r["label"]] for r in chunk]))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)


def compress(args, ranks=0):
    return run_stage("compress.py", args, ranks=ranks)


def lm_args(init, prepared, config, run, steps=STEPS):
    return ["--task", "lm", "--init", init, "--data", prepared, "--seq-length", "64", "--deepspeed_config", config,
            "--output", str(run), "--train-steps", str(steps), "--log-interval", "1", "--eval-interval", "0",
            "--save-interval", "0", "--eval-batches", "2", "--latency-repeats", "3"]


def losses(run):
    return [v for _, v in sorted(scalars(run, "Train/loss").items())]


def test_lm_int8_qat_on_two_ranks_in_bf16(llama_init, prepared, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.compression import load_compressed

    run = tmp_path / "int8"
    r = compress(lm_args(llama_init, prepared, compression_config("int8_qat.json", tmp_path, fp32=False), run), ranks=2)
    assert "bytes on disk" in r.stdout  # the before/after table
    summary = json.load(open(run / "summary.json"))
    assert summary["world_size"] == 2 and summary["precision"] == "bf16" and summary["steps"] == STEPS
    curve = losses(run)
    assert len(curve) == STEPS and curve[-1] < curve[0] - 0.5
    assert summary["bytes_after"] <= 0.3 * summary["bytes_before"]
    assert summary["params_after"] == summary["params_before"]
    for key in ("eval_ppl_before", "eval_ppl_after", "test_ppl_before", "test_ppl_after", "latency_ms_before",
                "latency_ms_after"):
        assert summary[key] > 0, key
    assert summary["eval_ppl_after"] < summary["eval_ppl_before"]  # trained from random weights
    assert summary["runtime"] == "int8"
    assert scalars(run, "Compress/eval_ppl_after")
    hf = AutoModelForCausalLM.from_pretrained(run / "hf")
    compressed = load_compressed(str(run / "compressed"), runtime="float")
    ids = torch.arange(32).reshape(1, 32) + 5
    with torch.no_grad():
        a, b = hf(input_ids=ids).logits, compressed(input_ids=ids).logits
    # Same weights; the compressed model also carries the trained int8 activation quantization.
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_classifier_half_the_layers_with_distillation(classify_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train, valid, test, init = classify_data
    run = tmp_path / "half"
    args = ["--task", "classify", "--init", init, "--train", train, "--valid", valid, "--test", test,
            "--deepspeed_config", compression_config("half_layers_kd.json", tmp_path), "--output", str(run),
            "--train-steps", "30", "--log-interval", "1", "--eval-interval", "0", "--save-interval", "0",
            "--latency-repeats", "3"]
    compress(args)
    summary = json.load(open(run / "summary.json"))
    curve = losses(run)
    assert sum(curve[-5:]) < sum(curve[:5])  # the student (half of the teacher's layers) recovers
    per_layer = (summary["params_before"] - summary["params_after"]) / 2
    assert per_layer == 4 * 64 * 64 + 4 * 64 + 2 * 64 * 128 + 128 + 64 + 2 * 2 * 64  # attention, MLP, 2 LayerNorms
    for key in ("test_accuracy_before", "test_accuracy_after", "valid_accuracy_before", "valid_accuracy_after"):
        assert 0 <= summary[key] <= 1, key
    assert summary["test_accuracy_before"] >= 0.9  # the teacher learned the task
    assert summary["test_accuracy_after"] >= 0.9   # and the student with half its layers still does
    model = AutoModelForSequenceClassification.from_pretrained(run / "hf")
    assert model.config.num_hidden_layers == 2 and model.config.id2label == {0: "fruit", 1: "mineral"}


def test_post_training_quantization_needs_no_training(llama_init, prepared, tmp_path):
    run = tmp_path / "ptq"
    args = lm_args(llama_init, prepared, compression_config("int8_ptq.json", tmp_path), run, steps=0)
    compress(args)
    summary = json.load(open(run / "summary.json"))
    assert summary["steps"] == 0 and not (run / "checkpoints").exists()
    assert summary["bytes_after"] <= 0.3 * summary["bytes_before"]
    assert summary["eval_ppl_after"] == pytest.approx(summary["eval_ppl_before"], rel=0.05)
    assert scalars(run, "Compress/bytes_after")


@pytest.fixture(scope="module")
def prune_config(tmp_path_factory):
    """prune_heads_rows.json pruning at step 4, under ZeRO-2, with a fixed 12-step schedule (a run stopped at
    step 6 and resumed follows the same one)."""
    root = tmp_path_factory.mktemp("prune_config")
    ratio = {"enabled": True, "schedule_offset": 4}
    path = compression_config(
        "prune_heads_rows.json", root,
        head_pruning={"shared_parameters": ratio, "different_groups": {"hp1": {"params": {"dense_ratio": 0.5},
                                                                             "modules": ["self_attn"]}}},
        row_pruning={"shared_parameters": ratio, "different_groups": {"rp1": {"params": {"dense_ratio": 0.5},
                                                                            "modules": ["mlp"]}}})
    ds = json.load(open(path))
    ds["zero_optimization"] = {"stage": 2}
    ds["scheduler"]["params"].update(total_num_steps=STEPS, warmup_num_steps=2)
    (root / "zero2.json").write_text(json.dumps(ds))
    return str(root / "zero2.json")


@pytest.fixture(scope="module")
def pruned_run(llama_init, prepared, prune_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("pruned") / "run"
    r = compress(lm_args(llama_init, prepared, prune_config, run) + ["--save-interval", "6"], ranks=2)
    return run, r.stdout


def test_heads_and_rows_pruned_on_two_ranks_with_zero2(pruned_run):
    from transformers import AutoModelForCausalLM

    run, stdout = pruned_run
    assert "step      4 | head_pruning: heads masked" in stdout
    summary = json.load(open(run / "summary.json"))
    assert summary["zero_stage"] == 2 and summary["world_size"] == 2
    # Per layer: attention 4 x 64 x 64 and MLP 3 x 64 x 128, each halved, over 4 layers.
    assert summary["params_before"] - summary["params_after"] == 4 * (2 * 64 * 64 + 3 * 64 * 64)
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert (model.config.num_attention_heads, model.config.intermediate_size) == (2, 64)
    assert losses(run)[-1] < losses(run)[0]


def test_resume_after_pruning_continues_the_uninterrupted_run(pruned_run, llama_init, prepared, prune_config, tmp_path):
    # A run stopped after its checkpoint of step 6 (pruned_run's, copied), two steps after the pruning at step 4.
    import shutil

    run, _ = pruned_run
    part = tmp_path / "part"
    shutil.copytree(run / "checkpoints" / "global_step6", part / "checkpoints" / "global_step6")
    (part / "checkpoints" / "latest").write_text("global_step6")
    r = compress(lm_args(llama_init, prepared, prune_config, part) + ["--save-interval", "6"], ranks=2)
    assert "at step 6" in r.stdout and "heads masked" not in r.stdout  # the masks came back with the checkpoint
    assert sorted(scalars(part, "Train/loss")) == list(range(7, STEPS + 1))
    assert losses(part) == pytest.approx(losses(run)[6:], abs=1e-5)
    after = json.load(open(part / "summary.json"))
    assert after["params_after"] == json.load(open(run / "summary.json"))["params_after"]


@pytest.mark.parametrize("edit, message", [
    ({"weight_quantization": {"shared_parameters": {"enabled": True},
                              "different_groups": {"wq1": {"params": {"target_bits": 8}, "modules": ["encoder"]}}}},
     "pattern 'encoder' matches no linear or conv1d or embedding module of this llama model"),
    ({"sparse_pruning": {"shared_parameters": {"enabled": True, "sparsity": 0.5},
                         "different_groups": {"sp1": {"params": {"dense_ratio": 0.5}, "modules": ["mlp"]}}}},
     "sparse_pruning.shared_parameters: unknown key 'sparsity'"),
    ({"row_pruning": {"shared_parameters": {"enabled": True},
                      "different_groups": {"rp1": {"params": {"dense_ratio": 2.0}, "modules": ["mlp"]}}}},
     "rp1.params.dense_ratio must be in (0, 1]"),
])
def test_bad_compression_config_fails_before_start(llama_init, prepared, tmp_path, monkeypatch, capsys, edit, message):
    ds = json.load(open(os.path.join(REPO, "ds_configs", "compression", "int8_ptq.json")))
    ds["compression"] = edit
    (tmp_path / "bad.json").write_text(json.dumps(ds))
    code = run_as_main("pipeline.compress", lm_args(llama_init, prepared, str(tmp_path / "bad.json"), tmp_path / "run"),
                       monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_dry_run_shows_what_each_method_selects(llama_init, prepared, tmp_path, monkeypatch, capsys):
    code = run_as_main("pipeline.compress", lm_args(llama_init, prepared, os.path.join(
        REPO, "ds_configs", "compression", "extreme.json"), tmp_path / "dry") + ["--dry-run"], monkeypatch)
    out = capsys.readouterr().out
    assert code == 0 and "layer_reduction" in out and "QAT int4 g32" in out and "train_batch_size" in out
    assert not (tmp_path / "dry").exists()
