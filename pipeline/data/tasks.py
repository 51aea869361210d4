"""Finetuning data: labelled texts for classification, prompt/response pairs for SFT, and their metrics.

Pure helpers shared by `pipeline.finetune` (training) and `pipeline.predict` (inference), so that a
text is tokenized the same way in both:

    tok = load_hf_tokenizer("runs/tiny/hf")          # an HF tokenizer folder, a prepared folder or a .model
    split = read_classification("train.jsonl", "text", "label", tok.tok, max_length=128)
    names = label_order(split.labels)                # the label set of the training file
    ids, truncated = encode_texts(tok.tok, ["a review"], max_length=128)
    batch = pad_batch(ids, pad_id=tok.pad_id)        # {"input_ids": (B, T), "attention_mask": (B, T)}

Rules (the README's finetune section says the same to users):
- Texts are tokenized with the tokenizer's own special tokens (`add_special_tokens=True`: [CLS] ... [SEP]
  for BERT tokenizers, <s> for Llama's, nothing for the SentencePiece tokenizers of `pipeline.prepare`)
  and truncated to `max_length` tokens; truncated texts are counted.
- Empty texts (nothing but whitespace) are dropped and counted, not an error: a scraped corpus has some,
  and a model cannot learn from them. A missing or empty label is an error naming the file and line.
- A file is jsonl, csv/tsv, parquet or a `save_to_disk` folder; `DIR:SPLIT` names one split of a
  DatasetDict folder (`data/reviews:train`), and a DatasetDict without one is an error.
- Labels are strings or integers; each is kept by its text, so 1 and "1" are the same label. The label
  ids follow the sorted label names (numerically when every name is an integer, so integer labels
  0..K-1 keep their values as ids).
- SFT: `prompt_ids + response_ids` with labels -100 on the prompt (and on padding): the loss is on the
  response only. The plain template is prompt then response then EOS; the chat template is the
  tokenizer's own (user turn = prompt, assistant turn = response).
"""
from __future__ import annotations

import math
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.readers import InputError, dataset_split, read_records

TEMPLATES = ("auto", "plain", "chat")


def load_hf_tokenizer(path: str):
    """An `HFTokenizer` (pipeline.data.tokenizer) from an HF tokenizer folder, a prepared data folder or a
    SentencePiece .model file; SentencePiece models are converted with `save_hf` (same ids)."""
    from pipeline.data.tokenizer import HFTokenizer, Tokenizer

    tok = Tokenizer.load(path)
    if tok.kind == "hf":
        return tok
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_hf(tmp)
        return HFTokenizer(tmp)


# ---------------------------------------------------------------- labels

def label_name(value, where: tuple[str, int | str], label_key: str) -> str:
    """A label value as its name: strings as they are (stripped), integers as digits."""
    path, line = where
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        kind = "null" if value is None else type(value).__name__
        raise InputError(path, line, f"label {label_key!r} is {kind}; expected a string or an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise InputError(path, line, f"label {label_key!r} is {value}; expected a string or an integer")
        value = int(value)
    name = str(value).strip()
    if not name:
        raise InputError(path, line, f"label {label_key!r} is empty; expected a label")
    return name


def label_order(names: Sequence[str]) -> list[str]:
    """The distinct label names in id order: numeric when all are integers, else alphabetical."""
    distinct = set(names)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


# ---------------------------------------------------------------- classification data

def records(path: str, keys: list[str], hint: str):
    """The records of one file (pipeline.data.readers.read_records), or of one split of a DatasetDict folder
    named as `DIR:SPLIT`."""
    return read_records(path, keys, fmt="hf" if dataset_split(path)[1] else "auto", hint=hint)


@dataclass
class ClassificationSplit:
    path: str
    ids: list[list[int]] = field(default_factory=list)      # token ids per example
    labels: list[str] = field(default_factory=list)         # label name per example
    where: list[tuple[str, int | str]] = field(default_factory=list)  # (file, line) per example
    truncated: int = 0                                       # examples cut to max_length
    dropped_empty: int = 0                                   # empty texts left out
    dropped_unseen_label: int = 0                            # valid/test: labels not in train left out

    def __len__(self) -> int:
        return len(self.ids)


def read_classification(path: str, text_key: str, label_key: str, tok, max_length: int) -> ClassificationSplit:
    """Read, check and tokenize one file of labelled texts (see the module doc for the rules)."""
    hint = "choose the fields with --text-key and --label-key"
    split = ClassificationSplit(path)
    texts = []
    for record in records(path, [text_key, label_key], hint):
        where = (record.source, record.line)
        text = record.values[text_key]
        if not isinstance(text, str):
            kind = "null" if text is None else type(text).__name__
            raise InputError(record.source, record.line, f"text {text_key!r} is {kind}; expected a string")
        name = label_name(record.values[label_key], where, label_key)
        if not text.strip():
            split.dropped_empty += 1
            continue
        texts.append(text)
        split.labels.append(name)
        split.where.append(where)
    split.ids, split.truncated = encode_texts(tok, texts, max_length)
    return split


def check_known_labels(split: ClassificationSplit, known: Sequence[str], train_path: str) -> None:
    """Every label of a valid/test split must occur in the training data (the head has no output for others)."""
    known_set = set(known)
    for name, (path, line) in zip(split.labels, split.where):
        if name not in known_set:
            raise InputError(path, line, f"label {name!r} does not occur in the training data {train_path}; "
                                         f"known labels: {', '.join(repr(k) for k in known)}")


def drop_unseen_labels(split: ClassificationSplit, known: Sequence[str]) -> Counter:
    """Leave out the examples whose label is not in `known` (counted in split.dropped_unseen_label);
    returns how many were dropped per label."""
    known_set = set(known)
    keep = [i for i, name in enumerate(split.labels) if name in known_set]
    dropped = Counter(name for name in split.labels if name not in known_set)
    split.ids = [split.ids[i] for i in keep]
    split.labels = [split.labels[i] for i in keep]
    split.where = [split.where[i] for i in keep]
    split.dropped_unseen_label += sum(dropped.values())
    return dropped


def encode_texts(tok, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text with the tokenizer's special tokens, cut to max_length; (ids, number cut)."""
    if not texts:
        return [], 0
    # verbose=False: transformers would warn that sequences over model_max_length "will result in indexing
    # errors"; they are cut right below, and counted.
    ids = tok(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    long = [i for i, seq in enumerate(ids) if len(seq) > max_length]
    if long:
        # Truncating through the tokenizer keeps its closing special token ([SEP]) where it has one.
        cut = tok([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        for i, seq in zip(long, cut):
            ids[i] = seq
    return ids, len(long)


def class_weights(label_ids: Sequence[int], num_labels: int) -> list[float]:
    """'balanced' weights, n / (K x n_c): each class contributes equally to the loss (sklearn's rule)."""
    counts = np.bincount(np.asarray(label_ids, dtype=np.int64), minlength=num_labels)
    return [len(label_ids) / (num_labels * c) if c else 0.0 for c in counts]


def imbalance(names: Sequence[str]) -> float:
    """Largest class count / smallest class count."""
    counts = Counter(names).values()
    return max(counts) / min(counts)


# ---------------------------------------------------------------- SFT data

def resolve_template(tok, template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}; expected one of {', '.join(TEMPLATES)}")
    has_chat = bool(getattr(tok, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ValueError("--template chat: this tokenizer has no chat_template; use --template plain")
    if template == "auto":
        return "chat" if has_chat else "plain"
    return template


def prompt_ids(tok, prompt: str, template: str) -> list[int]:
    """The ids a response follows: the prompt (plain) or the user turn + generation prompt (chat)."""
    if template == "chat":
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False, verbose=False)["input_ids"]  # the callers cut (see encode_texts)
    return tok(prompt, add_special_tokens=True, verbose=False)["input_ids"]


def response_ids(tok, prompt: str, response: str, template: str) -> list[int]:
    """The ids of the response: its text then EOS (plain), or the assistant turn as the template writes it (chat)."""
    if template == "chat":
        user = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        tail = full[len(head):] if full.startswith(head) else response
        return tok(tail, add_special_tokens=False, verbose=False)["input_ids"]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return tok(response, add_special_tokens=False, verbose=False)["input_ids"] + eos


@dataclass
class SFTSplit:
    path: str
    ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)   # -100 on the prompt
    truncated: int = 0          # responses cut at max_length
    dropped_empty: int = 0      # empty prompt and response, or an empty response
    dropped_long_prompt: int = 0  # prompts of max_length tokens or more: no response token would be left

    def __len__(self) -> int:
        return len(self.ids)


def sft_example(p_ids: list[int], r_ids: list[int], max_length: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) of one pair: labels -100 on the prompt; None when the prompt leaves no room."""
    if len(p_ids) >= max_length:
        return None
    r_ids = r_ids[:max_length - len(p_ids)]
    return p_ids + r_ids, [-100] * len(p_ids) + r_ids


def read_sft(path: str, prompt_key: str, response_key: str, tok, template: str, max_length: int) -> SFTSplit:
    split = SFTSplit(path)
    hint = "choose the fields with --prompt-key and --response-key"
    for record in records(path, [prompt_key, response_key], hint):
        prompt, response = record.values[prompt_key], record.values[response_key]
        for key, value in ((prompt_key, prompt), (response_key, response)):
            if not isinstance(value, str):
                kind = "null" if value is None else type(value).__name__
                raise InputError(record.source, record.line, f"{key!r} is {kind}; expected a string")
        if not response.strip():
            split.dropped_empty += 1
            continue
        p_ids, r_ids = prompt_ids(tok, prompt, template), response_ids(tok, prompt, response, template)
        example = sft_example(p_ids, r_ids, max_length)
        if example is None:
            split.dropped_long_prompt += 1
            continue
        split.truncated += len(p_ids) + len(r_ids) > max_length
        split.ids.append(example[0])
        split.labels.append(example[1])
    return split


def pack(ids: list[list[int]], labels: list[list[int]], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Lay examples end to end into sequences of at most max_length tokens, never splitting one.
    The examples of a sequence attend to each other (no per-example attention mask): the usual
    trade of packing, fewer pad tokens for a little cross-talk."""
    out_ids, out_labels = [], []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    for seq, lab in zip(ids, labels):
        if cur_ids and len(cur_ids) + len(seq) > max_length:
            out_ids.append(cur_ids)
            out_labels.append(cur_labels)
            cur_ids, cur_labels = [], []
        cur_ids = cur_ids + seq
        cur_labels = cur_labels + lab
    if cur_ids:
        out_ids.append(cur_ids)
        out_labels.append(cur_labels)
    return out_ids, out_labels


# ---------------------------------------------------------------- batches

def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, labels: Sequence[Sequence[int]] | None = None,
              left: bool = False) -> dict[str, np.ndarray]:
    """Pad to the longest sequence of the batch (dynamic padding). Shapes (B, T), int64.
    `labels` are padded with -100; `left` pads on the left (batched generation)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    out_labels = np.full((len(seqs), width), -100, dtype=np.int64) if labels is not None else None
    for i, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[i, span] = seq
        mask[i, span] = 1
        if out_labels is not None:
            out_labels[i, span] = labels[i]
    batch = {"input_ids": ids, "attention_mask": mask}
    if out_labels is not None:
        batch["labels"] = out_labels
    return batch


def eval_batches(n: int, micro: int, rank: int, world: int) -> list[list[int]]:
    """This rank's evaluation batches over examples 0..n-1: examples rank, rank + world, ... in batches of
    `micro`. Every rank gets the same number of batches (ZeRO-3 gathers parameters in each forward, so all
    ranks must run the same forwards); a rank that runs out gets empty batches, which run a throwaway
    forward and count nothing."""
    mine = list(range(rank, n, world))
    count = math.ceil(math.ceil(n / world) / micro) if n else 0
    return [mine[b * micro:(b + 1) * micro] for b in range(count)]


# ---------------------------------------------------------------- metrics

def classification_report(confusion: np.ndarray, names: Sequence[str]) -> dict:
    """Accuracy, macro-F1 (over the classes present in the labels or the predictions, as sklearn), and per-class
    precision/recall/F1/support from a confusion matrix with rows = true label, columns = predicted."""
    confusion = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (support > 0) | (predicted > 0)
    total = int(confusion.sum())
    return {"accuracy": float(tp.sum() / total) if total else float("nan"),
            "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
            "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                 "support": int(support[i])} for i, name in enumerate(names)},
            "confusion": confusion.tolist(), "examples": total}


def format_report(report: dict, names: Sequence[str]) -> str:
    """A per-class table and the confusion matrix, for the console."""
    width = max(8, *(len(n) for n in names))
    lines = [f"{'label':<{width}} precision  recall     f1  support"]
    for name in names:
        c = report["per_class"][name]
        lines.append(f"{name:<{width}} {c['precision']:9.3f} {c['recall']:7.3f} {c['f1']:6.3f} {c['support']:8d}")
    lines.append(f"accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
                 f"({report['examples']} examples)")
    lines.append("confusion (rows: true, columns: predicted): " + " ".join(f"{n}" for n in names))
    for name, row in zip(names, report["confusion"]):
        lines.append(f"  {name:<{width}} " + " ".join(f"{v:6d}" for v in row))
    return "\n".join(lines)


def format_per_class(report: dict, names: Sequence[str]) -> str:
    """The compact form for the evaluations during training: one line per class with precision, recall, F1,
    support and its row of the confusion matrix (true label per line, predicted per column)."""
    width = max(5, *(len(n) for n in names))
    cells = [max(4, len(n)) for n in names]
    lines = [f"  {'label':<{width}}  prec   rec    f1 support | predicted: "
             + " ".join(f"{n:>{w}}" for n, w in zip(names, cells))]
    for name, row in zip(names, report["confusion"]):
        c = report["per_class"][name]
        lines.append(f"  {name:<{width}} {c['precision']:5.3f} {c['recall']:5.3f} {c['f1']:5.3f} {c['support']:7d} | "
                     f"{'':11}" + " ".join(f"{v:>{w}d}" for v, w in zip(row, cells)))
    return "\n".join(lines)
