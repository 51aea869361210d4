"""Finetuning: data rules and metrics (unit), the loop's best-checkpoint/early-stop extension (a fake engine),
and end-to-end runs on CPU under the deepspeed launcher (slow): a classifier on 2 ranks, exact resume,
LoRA under ZeRO-3 with a merged export, SFT with AdaLoRA and packing, and the predict CLI."""
import copy
import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.data import tasks
from pipeline.data.readers import InputError
from tests.conftest import REPO, FakeEngine, run_as_main, run_stage, scalars

STEPS = 24
FRUIT = "apple pear plum cherry grape melon lemon peach".split()
STONE = "stone rock brick metal iron steel marble granite".split()
FILLER = "the a of and with very some big small old new red blue green over under".split()


def toy_examples(n, seed, labels=("fruit", "mineral")):
    """A separable task: the label says which word family the text mentions."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        label = rnd.choice(labels)
        words = [rnd.choice(FILLER) for _ in range(rnd.randint(3, 9))]
        words += [rnd.choice(FRUIT if label == "fruit" else STONE) for _ in range(2)]
        rnd.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def hf_tokenizer(prepared, tmp_path_factory):
    from pipeline.data.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok")
    Tokenizer.load(prepared).save_hf(str(path))
    from transformers import AutoTokenizer

    return str(path), AutoTokenizer.from_pretrained(str(path))


def tiny_init(kind, tok_dir, out):
    """A tiny model (2 layers, 64 wide) saved with save_pretrained, plus the HF tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(0)
    if kind == "llama":
        config = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=128, max_position_embeddings=128,
                                      vocab_size=1000, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                      tie_word_embeddings=True)
        model = AutoModelForCausalLM.from_config(config)
    else:
        config = AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=128, vocab_size=1000,
                                      pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = AutoModelForMaskedLM.from_config(config)
    model.save_pretrained(out)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), out)
    return str(out)


def ds_config(tmp_path, name="zero2.json", micro=4, lr=2e-3, fp32=True):
    ds = json.load(open(os.path.join(REPO, "ds_configs", name)))
    ds["optimizer"]["params"]["lr"] = lr
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["scheduler"]["params"].update(total_num_steps=STEPS, warmup_num_steps=2)  # fixed: resume keeps the schedule
    if fp32:
        ds["bf16"] = {"enabled": False}
    path = tmp_path / f"{name}_{micro}_{'fp32' if fp32 else 'bf16'}.json"
    path.write_text(json.dumps(ds))
    return str(path)


# ---------------------------------------------------------------- unit: data rules

def test_labels_are_kept_by_name_and_ordered(tmp_path):
    assert tasks.label_order(["10", "2", "1"]) == ["1", "2", "10"]  # integer labels keep their values as ids
    assert tasks.label_order(["pos", "neg"]) == ["neg", "pos"]
    where = ("f.jsonl", 3)
    assert tasks.label_name(1, where, "label") == tasks.label_name("1", where, "label") == "1"
    assert tasks.label_name(2.0, where, "label") == "2"
    for bad in (None, "  ", True, [1]):
        with pytest.raises(InputError, match=r"^f.jsonl:3: label 'label' is"):
            tasks.label_name(bad, where, "label")


def test_read_classification_drops_empty_texts_and_truncates(tmp_path, hf_tokenizer):
    _, tok = hf_tokenizer
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "the apple", "label": "fruit"}, {"text": "  ", "label": "x"},
                                             {"text": "iron " * 50, "label": 7}])
    split = tasks.read_classification(path, "text", "label", tok, max_length=16)
    assert len(split) == 2 and split.dropped_empty == 1 and split.truncated == 1
    assert split.labels == ["fruit", "7"] and split.where == [(path, 1), (path, 3)]
    assert max(len(s) for s in split.ids) == 16


def test_unseen_label_names_file_line_label_and_known_labels(tmp_path, hf_tokenizer):
    _, tok = hf_tokenizer
    path = write_jsonl(tmp_path / "valid.jsonl", [{"text": "a", "label": "fruit"}, {"text": "b", "label": "veg"}])
    split = tasks.read_classification(path, "text", "label", tok, max_length=16)
    with pytest.raises(InputError, match=rf"^{path}:2: label 'veg' does not occur in the training data t.jsonl; "
                                         r"known labels: 'fruit', 'mineral'"):
        tasks.check_known_labels(split, ["fruit", "mineral"], "t.jsonl")


def test_unseen_labels_are_dropped_and_counted_on_request(tmp_path, hf_tokenizer):
    _, tok = hf_tokenizer
    path = write_jsonl(tmp_path / "valid.jsonl", [{"text": "a", "label": "fruit"}, {"text": "b", "label": "veg"},
                                                  {"text": "c", "label": "veg"}, {"text": "d", "label": "nut"}])
    split = tasks.read_classification(path, "text", "label", tok, max_length=16)
    assert tasks.drop_unseen_labels(split, ["fruit", "mineral"]) == {"veg": 2, "nut": 1}
    assert split.labels == ["fruit"] and split.where == [(path, 1)] and len(split.ids) == 1
    assert split.dropped_unseen_label == 3


def test_a_dataset_dict_is_read_one_split_at_a_time(tmp_path, hf_tokenizer):
    import datasets

    _, tok = hf_tokenizer
    folder = str(tmp_path / "reviews")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["an apple", "a pear", "iron"], "label": [1, 1, 0]}),
        "test": datasets.Dataset.from_dict({"text": ["steel"], "label": [0]}),
    }).save_to_disk(folder)
    split = tasks.read_classification(f"{folder}:train", "text", "label", tok, max_length=16)
    assert split.labels == ["1", "1", "0"] and split.where[2] == (f"{folder}:train", "row 3")
    assert tasks.read_classification(f"{folder}:test", "text", "label", tok, max_length=16).labels == ["0"]
    with pytest.raises(InputError, match=rf"^{folder}: a DatasetDict with the splits train, test; name one as "
                                         rf"DIR:SPLIT \(e.g. {folder}:train\)"):
        tasks.read_classification(folder, "text", "label", tok, max_length=16)  # never all splits mixed
    with pytest.raises(InputError, match=r"no split 'valid' in this DatasetDict \(splits: train, test\)"):
        tasks.read_classification(f"{folder}:valid", "text", "label", tok, max_length=16)
    single = str(tmp_path / "single")
    datasets.Dataset.from_dict({"text": ["a"], "label": [0]}).save_to_disk(single)
    with pytest.raises(InputError, match="is a single Dataset, not a DatasetDict; drop ':train'"):
        tasks.read_classification(f"{single}:train", "text", "label", tok, max_length=16)
    colon = write_jsonl(tmp_path / "a:b.jsonl", [{"text": "a", "label": 0}])  # an existing name is never split
    assert tasks.read_classification(colon, "text", "label", tok, max_length=16).labels == ["0"]


def test_long_texts_do_not_trigger_the_indexing_errors_warning(hf_tokenizer):
    import logging

    _, tok = hf_tokenizer
    tok = copy.deepcopy(tok)
    tok.model_max_length = 8
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        ids, truncated = tasks.encode_texts(tok, ["iron " * 40, "apple"], max_length=8)
        tasks.prompt_ids(tok, "iron " * 40, "plain")
    finally:
        logger.removeHandler(handler)
    assert truncated == 1 and len(ids[0]) == 8
    assert not [r for r in records if "Token indices sequence length" in r.getMessage()]


def test_missing_key_names_file_and_line(tmp_path, hf_tokenizer):
    _, tok = hf_tokenizer
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "sentiment": "y"}])
    with pytest.raises(InputError, match=rf"^{path}:2: no key 'label' \(keys: 'text', 'sentiment'\); choose"):
        tasks.read_classification(path, "text", "label", tok, max_length=16)
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("body,label\nhello,x\n")
    with pytest.raises(InputError, match=rf"^{csv_path}:1: no column 'text' in the header"):
        tasks.read_classification(str(csv_path), "text", "label", tok, max_length=16)


def test_csv_and_parquet_records(tmp_path, hf_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, tok = hf_tokenizer
    csv_path = tmp_path / "a.csv"
    csv_path.write_text('text,label\n"an apple, ripe",1\nthe iron,0\n')
    split = tasks.read_classification(str(csv_path), "text", "label", tok, max_length=32)
    assert split.labels == ["1", "0"] and split.where[1] == (str(csv_path), 3)
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "a.parquet")
    split = tasks.read_classification(str(tmp_path / "a.parquet"), "text", "label", tok, max_length=32)
    assert split.labels == ["0", "1"] and split.where[1][1] == "row 2"


def test_class_weights_balance_the_classes():
    weights = tasks.class_weights([0, 0, 0, 1], 2)
    assert weights == pytest.approx([4 / 6, 2.0])  # n / (K x n_c): 3 x 2/3 == 1 x 2


def test_sft_labels_mask_the_prompt_and_padding(tmp_path, hf_tokenizer):
    _, tok = hf_tokenizer
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Question: what is a list?\n", "response": "A sequence."},
                                               {"prompt": "Hi", "response": "   "}])
    split = tasks.read_sft(str(path), "prompt", "response", tok, "plain", max_length=64)
    assert len(split) == 1 and split.dropped_empty == 1
    p_ids = tok("Question: what is a list?\n")["input_ids"]
    r_ids = tok("A sequence.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert split.ids[0] == p_ids + r_ids
    assert split.labels[0] == [-100] * len(p_ids) + r_ids  # loss only on the response (and its EOS)
    batch = tasks.pad_batch(split.ids + [[5, 6]], pad_id=0, labels=split.labels + [[-100, 6]])
    assert batch["labels"].shape == batch["input_ids"].shape == (2, len(p_ids) + len(r_ids))
    assert (batch["labels"][1, 2:] == -100).all() and (batch["attention_mask"][1, 2:] == 0).all()
    # A response cut at max_length keeps the prompt whole; a prompt that fills max_length is dropped.
    assert tasks.sft_example([1, 2, 3], [4, 5, 6], 5) == ([1, 2, 3, 4, 5], [-100, -100, -100, 4, 5])
    assert tasks.sft_example([1, 2, 3], [4], 3) is None


def test_sft_chat_template_labels_the_assistant_turn(hf_tokenizer):
    _, tok = hf_tokenizer
    tok = copy.deepcopy(tok)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert tasks.resolve_template(tok, "auto") == "chat"
    p_ids = tasks.prompt_ids(tok, "Why?", "chat")
    r_ids = tasks.response_ids(tok, "Why?", "Because.", "chat")
    assert tok.decode(p_ids) == "<|user|>Why?\n<|assistant|>" and tok.decode(r_ids) == "Because.\n"
    tok.chat_template = None
    assert tasks.resolve_template(tok, "auto") == "plain"
    with pytest.raises(ValueError, match="no chat_template"):
        tasks.resolve_template(tok, "chat")


def test_packing_keeps_examples_whole():
    ids = [[1] * 3, [2] * 4, [3] * 2, [4] * 6]
    labels = [[-100] * 3, [2] * 4, [3] * 2, [4] * 6]
    packed, packed_labels = tasks.pack(ids, labels, max_length=7)
    assert packed == [[1, 1, 1, 2, 2, 2, 2], [3, 3], [4] * 6]
    assert packed_labels[0] == [-100] * 3 + [2] * 4


def test_eval_batches_give_every_rank_the_same_forwards():
    for n, micro, world in [(10, 4, 2), (7, 2, 3), (1, 4, 2), (8, 4, 2)]:
        per_rank = [tasks.eval_batches(n, micro, r, world) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # same number of forward passes on every rank
        seen = sorted(i for batches in per_rank for b in batches for i in b)
        assert seen == list(range(n))  # every example exactly once


def test_classification_report():
    confusion = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # rows: true; the third class never occurs
    r = tasks.classification_report(confusion, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(5 / 6)
    f1_a, f1_b = 2 * 1 * 0.75 / 1.75, 2 * (2 / 3) * 1 / (5 / 3)
    assert r["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)  # over the classes present, as sklearn
    assert r["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.75, "f1": f1_a, "support": 4})
    assert r["confusion"] == confusion.tolist()
    table = tasks.format_per_class(r, ["a", "b", "c"]).splitlines()
    assert len(table) == 4 and table[1].split() == ["a", "1.000", "0.750", "0.857", "4", "|", "3", "1", "0"]


class FakeClassifierEngine:
    """Stands in for a DeepSpeed engine around a classifier that predicts label 0 for every text."""
    device = torch.device("cpu")

    def train_micro_batch_size_per_gpu(self):
        return 2

    def train_batch_size(self):
        return 2

    def eval(self):
        pass

    def train(self):
        pass

    def __call__(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.tensor([[2.0, 0.0]]).repeat(len(input_ids), 1))


def fake_classify_task(show=None):
    from pipeline import finetune

    splits = {name: tasks.ClassificationSplit(name, ids=[[5, 6], [7], [8, 9]], labels=["neg", "neg", "pos"])
              for name in ("train", "valid")}
    data = finetune.Data(SimpleNamespace(pad_id=0), None, 16, splits, label_names=["neg", "pos"])
    return finetune.ClassifyTask(data, FakeClassifierEngine(), 0, 1, 1, None, show=show)


def test_evaluation_during_training_has_per_class_precision_recall_and_prints_the_table():
    shown = []
    task = fake_classify_task(show=shown.append)
    metrics = task.evaluate(FakeClassifierEngine(), "valid")
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert (metrics["precision_neg"], metrics["recall_neg"]) == pytest.approx((2 / 3, 1.0))
    assert (metrics["precision_pos"], metrics["recall_pos"]) == (0.0, 0.0)  # the loop logs these as Eval/*
    assert shown and shown[0].startswith("valid per class:") and "predicted:" in shown[0]
    assert fake_classify_task().evaluate(FakeClassifierEngine(), "valid") == metrics  # compress: nothing printed


def test_task_state_carries_the_adalora_rank_pattern():
    class Updater:  # lora.AdaLoraUpdater's state interface
        def __init__(self, pattern):
            self.pattern = pattern

        def state(self):
            return {"rank_pattern": self.pattern}

        def load_state(self, state):
            self.pattern = state["rank_pattern"]

    task = fake_classify_task()
    task.next_batch()
    task.before_step = Updater({"layer.lora_E": [True, False]})
    state = task.state()
    assert state["adalora"] == {"rank_pattern": {"layer.lora_E": [True, False]}}
    other = fake_classify_task()
    other.before_step = Updater({"layer.lora_E": [True, True]})  # the final pattern, before loading the best one
    other.load_state(state)
    assert other.before_step.pattern == {"layer.lora_E": [True, False]} and other.state() == state
    plain = fake_classify_task()
    plain.load_state({k: v for k, v in state.items() if k != "adalora"})  # a checkpoint without AdaLoRA
    assert "adalora" not in plain.state()


# ---------------------------------------------------------------- unit: the loop's best checkpoint and early stop

class ScriptedTask:
    tokens_per_step = 1

    def __init__(self, values):
        self.values, self.evals = values, 0

    def next_batch(self):
        return {}

    def loss(self, engine, batch):
        return torch.tensor(1.0)

    def evaluate(self, engine, split):
        self.evals += 1
        return {"accuracy": self.values[self.evals - 1]}

    def state(self):
        return {}

    def load_state(self, state):
        pass


def test_loop_keeps_the_best_checkpoint_and_stops_early(tmp_path):
    from pipeline.monitor import Monitor
    from pipeline.training import LoopSettings, _BestTracker, best_checkpoint, checkpoint_tags, train

    settings = LoopSettings(train_steps=20, log_interval=100, eval_interval=2, save_interval=2, keep_checkpoints=1,
                            checkpoint_dir=str(tmp_path), best_metric="accuracy", patience=2)
    engine = FakeEngine()
    task = ScriptedTask([0.5, 0.7, 0.6, 0.65, 0.9])
    result = train(engine, task, settings, Monitor(engine, False, 1.0, None), 0)
    # Evaluations at steps 2, 4, 6, 8: the best is step 4; 6 and 8 do not improve -> stop at 8.
    assert result["stopped_early"] and result["steps"] == 8 and task.evals == 4
    assert result["best_step"] == 4 and result["best_value"] == 0.7
    assert best_checkpoint(str(tmp_path)) == {"metric": "accuracy", "value": 0.7, "tag": "global_step4", "step": 4}
    assert checkpoint_tags(str(tmp_path)) == ["global_step4", "global_step8"]  # the rotation spares the best
    assert open(tmp_path / "latest").read() == "global_step8"
    # A rerun resumes at step 8: two evaluations since the best, so it stops at once.
    tracker = _BestTracker(settings, 8, engine.device)
    assert (tracker.value, tracker.step, tracker.bad, tracker.exhausted) == (0.7, 4, 2, True)
    again = train(engine, ScriptedTask([]), settings, Monitor(engine, False, 1.0, None), 8)
    assert again["steps"] == 8 and again["stopped_early"]


def test_a_collapsed_fp16_loss_scale_stops_with_the_step_and_a_hint(tmp_path):
    from pipeline.monitor import Monitor
    from pipeline.training import LoopSettings, NonFiniteLoss, train

    class Overflowing(FakeEngine):
        steps = 0

        def step(self):  # what DeepSpeed's dynamic loss scaler raises at its minimum scale
            self.steps += 1
            if self.steps == 3:
                raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")

    settings = LoopSettings(train_steps=10, log_interval=100, eval_interval=0, save_interval=0, keep_checkpoints=1,
                            checkpoint_dir=str(tmp_path))
    engine = Overflowing()
    with pytest.raises(NonFiniteLoss, match=r"at step 3 even at the minimum loss scale.*bf16"):
        train(engine, ScriptedTask([]), settings, Monitor(engine, False, 1.0, None), 0)


def test_loop_evaluates_the_last_step_when_tracking(tmp_path):
    from pipeline.monitor import Monitor
    from pipeline.training import LoopSettings, best_checkpoint, train

    settings = LoopSettings(train_steps=5, log_interval=100, eval_interval=0, save_interval=0, keep_checkpoints=2,
                            checkpoint_dir=str(tmp_path), best_metric="loss", higher_is_better=False)
    engine = FakeEngine()
    task = ScriptedTask([0.3])
    task.evaluate = lambda engine, split: {"loss": 0.3}
    result = train(engine, task, settings, Monitor(engine, False, 1.0, None), 0)
    assert result["best_step"] == 5 and best_checkpoint(str(tmp_path))["tag"] == "global_step5"


# ---------------------------------------------------------------- end to end (the deepspeed launcher)

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return {split: write_jsonl(root / f"{split}.jsonl", toy_examples(n, seed))
            for split, n, seed in (("train", 200, 1), ("valid", 60, 2), ("test", 60, 3))}


@pytest.fixture(scope="module")
def llama_init(hf_tokenizer, tmp_path_factory):
    return tiny_init("llama", hf_tokenizer[0], tmp_path_factory.mktemp("llama"))


def classify_args(toy, init, run, config, steps=STEPS, extra=()):
    return ["--task", "classify", "--train", toy["train"], "--valid", toy["valid"], "--test", toy["test"],
            "--text-key", "text", "--label-key", "label", "--init", init, "--deepspeed_config", config,
            "--output", str(run), "--train-steps", str(steps), "--eval-interval", "8", "--save-interval", "8",
            "--log-interval", "1", "--max-length", "32", "--seed", "5", *extra]


@pytest.fixture(scope="module")
def classify_run(toy, llama_init, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run = root / "classify"
    run_stage("finetune.py", classify_args(toy, llama_init, run, ds_config(root, "zero2.json", micro=4)))
    return run


def losses(run):
    return [v for _, v in sorted(scalars(run, "Train/loss").items())]


@pytest.mark.slow
def test_classifier_learns_the_toy_task_on_two_ranks(classify_run):
    s = json.load(open(classify_run / "summary.json"))
    assert s["world_size"] == 2 and s["zero_stage"] == 2 and s["steps"] == STEPS
    assert s["valid_accuracy"] > 0.9 and s["test_accuracy"] > 0.9 and s["test_macro_f1"] > 0.9
    assert s["labels"] == ["fruit", "mineral"] and s["examples"] == {"train": 200, "valid": 60, "test": 60}
    assert sum(map(sum, s["valid_confusion"])) == 60  # summed over both ranks' shards, each example once
    assert set(s["valid_per_class"]["fruit"]) == {"precision", "recall", "f1", "support"}
    assert s["best_value"] == pytest.approx(s["valid_macro_f1"])  # RUN/hf holds the best checkpoint's weights
    assert json.load(open(classify_run / "checkpoints" / "best"))["step"] == s["best_step"]
    assert s["dropped_unseen_label"] == {"train": 0, "valid": 0, "test": 0}
    for tag in ("Eval/accuracy", "Eval/macro_f1", "Eval/loss", "Eval/precision_fruit", "Eval/recall_mineral"):
        assert sorted(scalars(classify_run, tag)) == [8, 16, 24]


@pytest.mark.slow
def test_export_loads_with_plain_transformers_and_reproduces_accuracy(classify_run, toy):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classify_run / "hf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(classify_run / "hf")
    assert model.config.id2label == {0: "fruit", 1: "mineral"} and model.config.pad_token_id == tok.pad_token_id
    records = [json.loads(line) for line in open(toy["test"])]
    batch = tok([r["text"] for r in records], padding=True, return_tensors="pt")  # right padding: last non-pad pools
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    accuracy = np.mean([model.config.id2label[p] == r["label"] for p, r in zip(predicted, records)])
    summary = json.load(open(classify_run / "summary.json"))
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1 / 60)


@pytest.mark.slow
def test_resume_continues_the_curve_of_an_uninterrupted_run(classify_run, toy, llama_init, tmp_path):
    # One process with micro 8 sees the same 8 examples per step as 2 ranks x micro 4 (one global data order),
    # in fp32: stopped at step 12 and resumed, its curve is the uninterrupted 2-rank run's.
    run = tmp_path / "resumed"
    config = ds_config(tmp_path, "zero0.json", micro=8)
    run_stage("finetune.py", classify_args(toy, llama_init, run, config, steps=12), ranks=0)
    r = run_stage("finetune.py", classify_args(toy, llama_init, run, config, steps=STEPS), ranks=0)
    assert "resumed from" in r.stdout and "at step 12" in r.stdout
    assert losses(run) == pytest.approx(losses(classify_run), abs=2e-3)
    assert json.load(open(run / "summary.json"))["steps"] == STEPS


@pytest.mark.slow
def test_lora_under_zero3_trains_only_adapters_and_merges(toy, hf_tokenizer, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    init = tiny_init("bert", hf_tokenizer[0], tmp_path / "bert")
    run = tmp_path / "lora"
    run_stage("finetune.py", classify_args(toy, init, run, ds_config(tmp_path, "zero3.json", micro=4), steps=8,
                                           extra=["--lora", "--lora-r", "4", "--keep-adapters"]))
    s = json.load(open(run / "summary.json"))
    assert s["lora"] == "lora" and s["zero_stage"] == 3
    assert 0 < s["trainable_parameters"] < s["parameters"] / 10
    # The merged export differs from the init only where adapters or the head were trained.
    before, after = load_file(os.path.join(init, "model.safetensors")), load_file(run / "hf" / "model.safetensors")
    changed = {k for k in after if k in before and not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("query.weight", "value.weight")) for k in changed), changed
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= set(after) - set(before)  # new head, trained
    # The adapter on the base model predicts what the merged model predicts.
    merged = AutoModelForSequenceClassification.from_pretrained(run / "hf", dtype=torch.float32).eval()
    base = AutoModelForSequenceClassification.from_pretrained(
        init, num_labels=2, id2label=merged.config.id2label, label2id=merged.config.label2id, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(run / "hf")
    batch = tok([json.loads(line)["text"] for line in open(toy["test"])][:16], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted(**batch).logits, atol=1e-4)


@pytest.mark.slow
def test_sft_with_adalora_and_packing_then_generate(llama_init, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    rnd = random.Random(0)
    words = "apple stone river cloud green seven quiet table".split()
    pairs = []
    for _ in range(120):
        w = " ".join(rnd.choice(words) for _ in range(3))
        pairs.append({"q": f"Repeat: {w}\n", "a": w})
    train = write_jsonl(tmp_path / "train.jsonl", pairs[:100])
    valid = write_jsonl(tmp_path / "valid.jsonl", pairs[100:])
    run = tmp_path / "sft"
    run_stage("finetune.py", ["--task", "sft", "--train", train, "--valid", valid, "--prompt-key", "q",
                              "--response-key", "a", "--init", llama_init, "--deepspeed_config",
                              ds_config(tmp_path, "zero2.json", micro=4), "--output", str(run), "--train-steps", "16",
                              "--eval-interval", "8", "--log-interval", "1", "--packing", "--max-length", "64",
                              "--adalora", "--lora-r", "4", "--keep-adapters"], ranks=0)
    s = json.load(open(run / "summary.json"))
    assert s["task"] == "sft" and s["lora"] == "adalora" and s["packing"] and s["template"] == "plain"
    assert s["examples"]["train"] == 100 and s["train_sequences"] < 100  # packed
    curve = losses(run)
    assert curve[-1] < curve[0] and s["eval_ppl"] == pytest.approx(np.exp(s["eval_loss"]))
    config = json.load(open(run / "adapter" / "adapter_config.json"))
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"]  # the budget was allocated
    # The best checkpoint carries its own rank pattern, and that is the one exported.
    best = json.load(open(run / "checkpoints" / "best"))
    state = torch.load(run / "checkpoints" / best["tag"] / "mp_rank_00_model_states.pt", weights_only=False)
    stored = state["data"]["adalora"]["rank_pattern"]  # peft drops the adapter name from the keys when saving
    assert {k.replace(".default", ""): v for k, v in stored.items()} == config["rank_pattern"]
    assert AutoModelForCausalLM.from_pretrained(run / "hf").config.model_type == "llama"
    out = tmp_path / "generated.jsonl"
    write_jsonl(tmp_path / "prompts.jsonl", [{"text": "Repeat: apple stone river\n"}, {"text": "Repeat: cloud\n"}])
    assert run_as_main("pipeline.predict", ["--model", str(run / "hf"), "--input", str(tmp_path / "prompts.jsonl"),
                                            "--output", str(out), "--max-new-tokens", "5"], monkeypatch) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["prompt"] for r in rows] == ["Repeat: apple stone river\n", "Repeat: cloud\n"]
    assert all(isinstance(r["generated"], str) for r in rows)


@pytest.mark.slow
def test_predict_cli_on_the_classifier_reads_stdin(classify_run):
    text = "an apple and a ripe plum\nsome iron and old steel\n" + json.dumps({"text": "grape melon"}) + "\n"
    r = subprocess.run([sys.executable, "-m", "pipeline.predict", "--model", str(classify_run / "hf")], input=text,
                       cwd=REPO, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["label"] for row in rows] == ["fruit", "mineral", "fruit"]
    assert all(abs(sum(row["probs"].values()) - 1) < 1e-5 and row["score"] == max(row["probs"].values())
               for row in rows)


def test_unseen_label_is_an_error_before_anything_starts(toy, llama_init, tmp_path, monkeypatch, capsys):
    valid = write_jsonl(tmp_path / "valid.jsonl", toy_examples(2, 9) + [{"text": "a carrot", "label": "vegetable"}])
    code = run_as_main("pipeline.finetune", ["--train", toy["train"], "--valid", valid, "--init", llama_init,
                                             "--deepspeed_config", os.path.join(REPO, "ds_configs", "zero0.json"),
                                             "--output", str(tmp_path / "run")], monkeypatch)
    assert code == 2
    assert (f"{valid}:3: label 'vegetable' does not occur in the training data {toy['train']}; "
            "known labels: 'fruit', 'mineral'") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_predict_skips_empty_texts_and_counts_truncated_ones(llama_init, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline import predict

    classifier = tmp_path / "classifier"
    AutoModelForSequenceClassification.from_pretrained(llama_init, num_labels=2, id2label={0: "no", 1: "yes"},
                                                       pad_token_id=0).save_pretrained(classifier)
    AutoTokenizer.from_pretrained(llama_init).save_pretrained(classifier)
    texts = ["", "an apple", "   ", "iron " * 200, "a pear"]  # the model takes 128 positions
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "out.jsonl"
    assert predict.main(["--model", str(classifier), "--input", inputs, "--output", str(out), "--batch-size", "3",
                         "--device", "cpu"]) == 5
    rows = [json.loads(line) for line in open(out)]
    assert [r["text"] for r in rows] == texts  # every input has its row, in order
    for i in (0, 2):
        assert rows[i] == {"text": texts[i], "label": None, "score": None, "probs": None, "skipped": "empty text"}
    assert all(r["label"] in ("no", "yes") and "skipped" not in r for r in (rows[1], rows[3], rows[4]))
    err = capsys.readouterr().err
    assert "predict: 3 predictions (classify)" in err and "predict: 2 empty texts skipped" in err
    assert "predict: 1 texts truncated to 128 tokens" in err
    # A batch of nothing but empty texts never reaches the model; a causal LM skips them the same way.
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"text": t} for t in ["", "  ", "apple " * 200, "pear"]])
    assert predict.main(["--model", llama_init, "--input", prompts, "--output", str(out), "--batch-size", "2",
                         "--max-new-tokens", "2", "--device", "cpu"]) == 4
    rows = [json.loads(line) for line in open(out)]
    assert [r["generated"] is None and r["skipped"] == "empty text" for r in rows[:2]] == [True, True]
    assert all(isinstance(r["generated"], str) and "skipped" not in r for r in rows[2:])
    err = capsys.readouterr().err
    assert "predict: 2 empty texts skipped" in err and "predict: 1 texts truncated to 126 tokens" in err


def test_dry_run_reads_dataset_dict_splits_and_drops_unseen_labels(toy, llama_init, tmp_path, capsys):
    import datasets

    from pipeline import finetune

    records = {split: [json.loads(line) for line in open(toy[split])] for split in ("train", "valid")}
    records["valid"].append({"text": "a carrot", "label": "vegetable"})
    folder = str(tmp_path / "toy")
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in records.items()}).save_to_disk(folder)
    base = ["--train", f"{folder}:train", "--valid", f"{folder}:valid", "--init", llama_init, "--deepspeed_config",
            os.path.join(REPO, "ds_configs", "zero0.json"), "--output", str(tmp_path / "dry"), "--dry-run"]
    with pytest.raises(InputError, match="label 'vegetable' does not occur in the training data"):
        finetune.main(base)
    assert finetune.main([*base, "--unseen-labels", "drop"]) == {}
    captured = capsys.readouterr()
    assert f"train: 200 examples from {folder}:train" in captured.out and "valid: 60 examples" in captured.out
    assert (f"{folder}:valid: 1 examples dropped (--unseen-labels drop): their labels do not occur in the "
            "training data ('vegetable': 1)") in captured.err
    with pytest.raises(ValueError, match="applies to --task classify only"):
        finetune.main([*base, "--task", "sft", "--unseen-labels", "drop"])


def test_dry_run_and_argument_errors(toy, llama_init, tmp_path, capsys):
    from pipeline import finetune

    base = ["--train", toy["train"], "--valid", toy["valid"], "--init", llama_init, "--deepspeed_config",
            os.path.join(REPO, "ds_configs", "zero2.json"), "--output", str(tmp_path / "dry")]
    assert finetune.main([*base, "--dry-run", "--lora"]) == {}
    out = capsys.readouterr().out
    assert "trainable (LoRA)" in out and "labels: fruit, mineral" in out and "train_batch_size" in out
    assert not (tmp_path / "dry").exists()
    for extra, message in [(["--epochs", "2", "--train-steps", "3"], "exclusive"),
                           (["--task", "sft", "--metric-for-best", "accuracy"], "does not apply"),
                           (["--max-length", "4096"], "above the model's maximum"),
                           (["--keep-adapters"], "needs --lora")]:
        with pytest.raises(ValueError, match=message):
            finetune.main([*base, *extra])


def test_init_from_a_classifier_of_other_labels_gets_a_new_head(toy, llama_init, tmp_path, capsys):
    # Finetuning a finetuned classifier (a run's hf/) on a task with another number of labels.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline import finetune

    classifier = tmp_path / "classifier"
    AutoModelForSequenceClassification.from_pretrained(llama_init, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                                                       pad_token_id=0).save_pretrained(classifier)
    AutoTokenizer.from_pretrained(llama_init).save_pretrained(classifier)
    assert finetune.main(["--train", toy["train"], "--valid", toy["valid"], "--init", str(classifier),
                          "--deepspeed_config", os.path.join(REPO, "ds_configs", "zero0.json"),
                          "--output", str(tmp_path / "dry"), "--dry-run"]) == {}
    captured = capsys.readouterr()
    assert "labels: fruit, mineral" in captured.out
    assert (f"--init {classifier} is a classifier of the labels a, b, c: its head is replaced by a new one for "
            "fruit, mineral") in captured.err
