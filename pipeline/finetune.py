"""Finetuning: a text classifier (`--task classify`) or instruction tuning (`--task sft`), full or LoRA.

The model starts from a local HuggingFace checkpoint (`--init`: a pretraining run's `hf/` folder or any
local HF model; encoder or decoder for classification, decoder for SFT). The DeepSpeed JSON decides
ZeRO stage, offload, precision, batch sizes, optimizer and schedule, exactly as for pretraining; the
flags say what to train on and for how long.

One process:
    python -m pipeline.finetune --task classify --train data/sentiment/train.jsonl \\
        --valid data/sentiment/valid.jsonl --test data/sentiment/test.jsonl --text-key text --label-key label \\
        --init build/demo/pretrain/hf --deepspeed_config ds_configs/zero0.json --output runs/sentiment --epochs 3
One node, N ranks (add --lora for LoRA adapters, under any ZeRO stage):
    deepspeed --num_gpus 2 pipeline/finetune.py --task classify ... --deepspeed_config ds_configs/zero2.json
Several nodes (see hostfiles/ and the README's multi-node section):
    deepspeed --hostfile hostfiles/two_nodes pipeline/finetune.py ... (same flags)
Instruction tuning (loss on the response tokens only):
    deepspeed --num_gpus 2 pipeline/finetune.py --task sft --train pairs.jsonl --valid pairs_valid.jsonl \\
        --prompt-key prompt --response-key response --init runs/tiny/hf --deepspeed_config ds_configs/zero2.json \\
        --output runs/sft --epochs 2 [--packing] [--lora]

Classification: labels (strings or integers) become the model config's id2label/label2id; the head is
new (AutoModelForSequenceClassification; decoders pool the last non-pad token, so pad_token_id is
set). Batches are padded per batch. Valid is evaluated every --eval-interval steps (accuracy, macro-F1,
loss, per-class precision/recall; rank 0 prints a per-class table with the confusion matrix); the best
checkpoint by --metric-for-best is kept (RUN/checkpoints/best), --patience stops early, and at the end
the best weights are evaluated on valid and test (per-class precision/recall, confusion matrix) and
exported to RUN/hf (adapters merged under --lora; --keep-adapters also writes RUN/adapter).
Rerunning the same command resumes from RUN/checkpoints/latest. Bad data stops before any process
starts with FILE:LINE and what was expected; empty texts are dropped and counted, long texts truncated
and counted (summary.json: dropped_empty, truncated); a valid/test label that train lacks is an error, or
dropped and counted with --unseen-labels drop (dropped_unseen_label). A DatasetDict folder (save_to_disk)
is given one split at a time as DIR:SPLIT, e.g. --train data/reviews:train --valid data/reviews:validation.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field

if __package__ in (None, ""):  # `deepspeed pipeline/finetune.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from pipeline.cli import arg, parse, run_main
from pipeline.files import check_output_folder, start_run_folder

TASKS = ("classify", "sft")
METRICS = {"classify": ("macro_f1", "accuracy", "loss"), "sft": ("loss",)}
DEFAULT_EPOCHS = 3.0
DEFAULT_MAX_LENGTH = 512


@dataclass
class Args:
    task: str = arg("classify", help="classify: text -> label; sft: prompt -> response (loss on the response only)",
                    choices=list(TASKS))
    train: str = arg(help="training file: jsonl, csv/tsv, parquet or a HF dataset folder (DIR:SPLIT for one split "
                          "of a DatasetDict, e.g. data/reviews:train)", required=True, metavar="F")
    valid: str = arg(help="validation file (same format): evaluated during training, picks the best checkpoint",
                     required=True, metavar="F")
    test: str = arg(help="test file (same format): evaluated once at the end with the best weights", metavar="F")
    init: str = arg(help="the model to start from: a local HF folder (a pretraining run's hf/, or any HF checkpoint)",
                    required=True, metavar="HF_DIR")
    tokenizer: str = arg(help="tokenizer (default: the one in --init): an HF tokenizer folder, a prepared data folder "
                              "or a SentencePiece .model", metavar="PATH")
    deepspeed_config: str = arg(help="DeepSpeed JSON (ds_configs/*.json): ZeRO, precision, batch sizes, optimizer, "
                                     "scheduler, monitoring; \"auto\" values are filled by this stage",
                                required=True, flag="--deepspeed_config", aliases=("--deepspeed-config",),
                                metavar="JSON")
    output: str = arg(help="the run folder; rerunning with the same folder resumes from its last checkpoint",
                      required=True, metavar="RUN")
    text_key: str = arg("text", help="classify: the field (jsonl key, csv column) holding the text")
    label_key: str = arg("label", help="classify: the field holding the label (a string or an integer)")
    prompt_key: str = arg("prompt", help="sft: the field holding the prompt")
    response_key: str = arg("response", help="sft: the field holding the response")
    template: str = arg("auto", help="sft: plain (prompt, response, EOS), chat (the tokenizer's chat template) or "
                                     "auto (chat when the tokenizer has one)", choices=["auto", "plain", "chat"])
    packing: bool = arg(False, help="sft: pack several training pairs into each --max-length sequence (fewer pad "
                                    "tokens; the pairs of a sequence attend to each other)")
    max_length: int = arg(help=f"tokens per example; longer texts are truncated and counted (default: "
                               f"{DEFAULT_MAX_LENGTH} or the model's maximum, whichever is smaller)")
    train_steps: int = arg(help="optimizer steps to train (also the LR schedule's length when the JSON says "
                                "\"auto\"); exclusive with --epochs")
    epochs: float = arg(help=f"passes over the training data, converted to steps (default {DEFAULT_EPOCHS:g} when "
                             "--train-steps is not given)")
    eval_interval: int = arg(help="optimizer steps between validation runs (default: one epoch; 0: only at the end)")
    save_interval: int = arg(help="optimizer steps between checkpoints, and one at the last step (default: --eval-interval; "
                                  "0: only when the validation metric improves or --patience stops the run); a "
                                  "better validation metric always saves one")
    metric_for_best: str = arg(help="validation metric that picks the best checkpoint: macro_f1 (default), accuracy "
                                    "or loss for classify; loss for sft", choices=["macro_f1", "accuracy", "loss"])
    patience: int = arg(0, help="stop after this many validation runs without a better --metric-for-best "
                                "(0: never stop early)")
    unseen_labels: str = arg("error", help="classify: a valid/test label that the training data lacks stops the "
                                           "run (error) or its examples are left out, counted and warned about "
                                           "(drop; summary.json dropped_unseen_label)", choices=["error", "drop"])
    class_weights: str = arg("none", help="classify: 'balanced' weighs each class's loss by n / (classes x n_class) "
                                          "for imbalanced data", choices=["none", "balanced"])
    lora: bool = arg(False, help="train LoRA adapters (peft) instead of all weights; the export merges them")
    adalora: bool = arg(False, help="AdaLoRA: adapters whose ranks are pruned from 1.5 x --lora-r to an average of "
                                    "--lora-r by importance (implies --lora)")
    lora_r: int = arg(8, help="LoRA rank")
    lora_alpha: float = arg(16.0, help="LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = arg(0.05, help="dropout on the LoRA input")
    lora_targets: list[str] = arg(help="module names to adapt (default: peft's for the model type, e.g. q_proj "
                                       "v_proj for Llama, query value for BERT, c_attn for GPT-2)")
    keep_adapters: bool = arg(False, help="with --lora: also write the adapters alone to RUN/adapter/ "
                                          "(PeftModel.from_pretrained)")
    seed: int = arg(1234, help="seed for the new head, the adapters, data order and dropout")
    log_interval: int = arg(10, help="optimizer steps between console lines and TensorBoard train scalars")
    keep_checkpoints: int = arg(2, help="how many most recent checkpoints to keep (the best one is kept as well)")
    dry_run: bool = arg(False, help="read and check the data, resolve the config, build the model on CPU, print "
                                    "parameters, batch arithmetic and the final DeepSpeed JSON, then exit")


def check_args(args: Args) -> None:
    """Flag errors that need no data and no process group."""
    check_output_folder(args.output)
    if args.adalora:
        args.lora = True
    if args.train_steps is not None and args.epochs is not None:
        raise ValueError("--train-steps and --epochs are exclusive; give one")
    for name in ("train_steps", "epochs", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("log_interval", "keep_checkpoints", "lora_r"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("eval_interval", "save_interval", "patience"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or positive, got {getattr(args, name)}")
    if args.metric_for_best is not None and args.metric_for_best not in METRICS[args.task]:
        raise ValueError(f"--metric-for-best {args.metric_for_best} does not apply to --task {args.task} "
                         f"(choose from {', '.join(METRICS[args.task])})")
    if args.task == "sft" and args.class_weights != "none":
        raise ValueError("--class-weights applies to --task classify only")
    if args.task == "sft" and args.unseen_labels != "error":
        raise ValueError("--unseen-labels applies to --task classify only")
    if args.task == "classify" and args.packing:
        raise ValueError("--packing applies to --task sft only")
    if args.keep_adapters and not args.lora:
        raise ValueError("--keep-adapters needs --lora")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")


# ---------------------------------------------------------------- data, read and checked before any process starts

@dataclass
class Data:
    tokenizer: object                 # pipeline.data.tokenizer.HFTokenizer
    model_config: object              # transformers config of --init
    max_length: int
    splits: dict                      # "train"/"valid"/"test" -> ClassificationSplit or SFTSplit
    label_names: list[str] = field(default_factory=list)  # classify: id -> name
    template: str | None = None       # sft
    warnings: list[str] = field(default_factory=list)
    examples: dict = field(default_factory=dict)  # split -> examples read (SFT pairs before --packing)

    @property
    def mean_length(self) -> float:
        return float(np.mean([len(s) for s in self.splits["train"].ids]))


def load_data(args: Args) -> Data:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    from pipeline.data import tasks
    from pipeline.data.readers import dataset_split
    from pipeline.data.tokenizer import TokenizerError
    from pipeline.models import max_positions
    from pipeline.models.presets import ENCODERS

    if not os.path.isfile(os.path.join(args.init, "config.json")):
        raise FileNotFoundError(f"--init {args.init}: no config.json; expected a HuggingFace model folder "
                                "(e.g. a pretraining run's hf/)")
    config = AutoConfig.from_pretrained(args.init, trust_remote_code=False)
    if args.task == "classify" and config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(f"--init {args.init}: transformers has no sequence classifier for model type "
                         f"{config.model_type!r}")
    if args.task == "sft" and (config.model_type in ENCODERS or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        raise ValueError(f"--init {args.init}: --task sft needs a decoder (causal LM); {config.model_type!r} is not one")
    try:
        tokenizer = tasks.load_hf_tokenizer(args.tokenizer or args.init)
    except TokenizerError as e:
        hint = "" if args.tokenizer else "; give the tokenizer with --tokenizer PATH"
        raise ValueError(f"{e}{hint}") from None
    if args.tokenizer:
        # --init's embeddings were trained on its own tokenizer's ids: another tokenizer would feed them other
        # pieces under the same ids, silently.
        from pipeline.data.prepared import check_model_tokenizer

        check_model_tokenizer(args.init, tokenizer, "--init", f"--tokenizer {args.tokenizer}",
                              "leave out --tokenizer to use the model's own")
    warnings = []
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but --init {args.init} only "
                         f"{config.vocab_size} embeddings; use the model's own tokenizer")
    if tokenizer.pad_id is None:
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; batches cannot be padded")
        tokenizer.tok.pad_token = tokenizer.tok.eos_token  # GPT-2 style: pad with EOS (masked out anyway)
        tokenizer.pad_id = tokenizer.tok.pad_token_id
        warnings.append(f"the tokenizer has no pad token: padding with EOS ({tokenizer.tok.eos_token!r})")

    limit = max_positions(config)
    if args.max_length is not None and limit is not None and args.max_length > limit:
        raise ValueError(f"--max-length {args.max_length} is above the model's maximum of {limit} positions")
    max_length = args.max_length or min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)

    paths = {"train": args.train, "valid": args.valid, **({"test": args.test} if args.test else {})}
    for name, path in paths.items():
        if not os.path.exists(dataset_split(path)[0]):  # DIR:SPLIT names a split of a DatasetDict folder
            raise FileNotFoundError(f"--{name} {path}: no such file or folder")
    data = Data(tokenizer, config, max_length, {}, warnings=warnings)
    tok = tokenizer.tok
    if args.task == "classify":
        for name, path in paths.items():
            data.splits[name] = tasks.read_classification(path, args.text_key, args.label_key, tok, max_length)
        train = data.splits["train"]
        if len(train) == 0:
            raise ValueError(f"--train {args.train}: no examples with a non-empty text")
        data.label_names = tasks.label_order(train.labels)
        if len(data.label_names) < 2:
            raise ValueError(f"--train {args.train}: every example has the label {data.label_names[0]!r}; a classifier "
                             "needs at least two labels")
        for name in ("valid", "test"):
            if name not in data.splits:
                continue
            split = data.splits[name]
            if args.unseen_labels == "error":
                tasks.check_known_labels(split, data.label_names, args.train)
                continue
            dropped = tasks.drop_unseen_labels(split, data.label_names)
            if dropped:
                counts = ", ".join(f"{label!r}: {n}" for label, n in sorted(dropped.items()))
                warnings.append(f"{split.path}: {split.dropped_unseen_label} examples dropped (--unseen-labels drop): "
                                f"their labels do not occur in the training data ({counts})")
        previous = init_labels(config)
        if previous is not None and previous != data.label_names:
            warnings.append(f"--init {args.init} is a classifier of the labels {', '.join(previous)}: "
                            + ("its head is replaced by a new one for " if len(previous) != len(data.label_names)
                               else "its head's outputs are reused, in order, for ") + ", ".join(data.label_names))
        ratio = tasks.imbalance(train.labels)
        if ratio >= 3 and args.class_weights == "none":
            warnings.append(f"{args.train}: the largest class is {ratio:.1f}x the smallest; consider "
                            "--class-weights balanced and --metric-for-best macro_f1")
    else:
        data.template = tasks.resolve_template(tok, args.template)
        for name, path in paths.items():
            data.splits[name] = tasks.read_sft(path, args.prompt_key, args.response_key, tok, data.template, max_length)
        if len(data.splits["train"]) == 0:
            raise ValueError(f"--train {args.train}: no usable prompt/response pairs (empty responses, or prompts of "
                             f"{max_length} tokens or more)")
    data.examples = {name: len(split) for name, split in data.splits.items()}
    if args.task == "sft" and args.packing:
        train = data.splits["train"]
        train.ids, train.labels = tasks.pack(train.ids, train.labels, max_length)
    for name, split in data.splits.items():
        if name != "train" and len(split) == 0:
            raise ValueError(f"--{name} {split.path}: no usable examples")
        if split.truncated:
            warnings.append(f"{split.path}: {split.truncated} examples truncated to --max-length {max_length} tokens")
        if split.dropped_empty:
            warnings.append(f"{split.path}: {split.dropped_empty} examples with an empty "
                            f"{'text' if args.task == 'classify' else 'response'} dropped")
        if getattr(split, "dropped_long_prompt", 0):
            warnings.append(f"{split.path}: {split.dropped_long_prompt} examples dropped: the prompt alone has "
                            f"--max-length {max_length} tokens or more")
    return data


def init_labels(config) -> list[str] | None:
    """The label names of an --init that is already a sequence classifier (a finetune run's hf/), in id order;
    None for a language model."""
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        return None
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def label_ids(data: Data, split: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(data.label_names)}
    return np.asarray([index[n] for n in data.splits[split].labels], dtype=np.int64)


def steps_for(args: Args, examples: int, train_batch: int) -> int:
    """--train-steps, or --epochs (default 3) over the training examples at this train batch size."""
    if args.train_steps is not None:
        return args.train_steps
    return max(1, math.ceil((args.epochs or DEFAULT_EPOCHS) * examples / train_batch))


# ---------------------------------------------------------------- tasks for the shared loop

class _ExampleTask:
    """What classify and SFT share: the data order (a seeded permutation per epoch of the training examples,
    one global order of which each rank takes its slice per micro-step, exact on resume at any world size),
    sharded evaluation, and the Task state."""

    before_step = None  # set to an AdaLoraUpdater under --adalora (see pipeline.training.Task)

    def __init__(self, data: Data, engine, dp_rank: int, dp_size: int, seed: int):
        from pipeline.data.packing import BlendedSampler

        self.data, self.device = data, engine.device
        self.micro = engine.train_micro_batch_size_per_gpu()
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.pad_id = data.tokenizer.pad_id
        self.sampler = BlendedSampler([data.splits["train"].ids], [1.0], seed)
        self.tokens_per_step = data.mean_length * engine.train_batch_size()

    def next_batch(self) -> dict:
        samples = self.sampler.next_samples(self.micro * self.dp_size)
        mine = samples[self.dp_rank * self.micro:(self.dp_rank + 1) * self.micro]
        return self._batch("train", [w for _, _, w in mine])

    def _batch(self, split: str, indices: list[int]) -> dict:
        raise NotImplementedError

    def _tensors(self, batch: dict) -> dict:
        import torch

        return {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}

    def _eval_batches(self, split: str):
        """(batch, weight) for every eval batch of this rank; weight 0 for a throwaway batch (see eval_batches)."""
        from pipeline.data.tasks import eval_batches

        for indices in eval_batches(len(self.data.splits[split]), self.micro, self.dp_rank, self.dp_size):
            yield self._batch(split, indices or [0]), len(indices)

    def state(self) -> dict:
        state = self.sampler.state()
        if self.before_step is not None:  # AdaLoRA's rank budget: the export of a checkpoint masks with its own
            state["adalora"] = self.before_step.state()
        return state

    def load_state(self, state: dict) -> None:
        state = dict(state)
        adalora = state.pop("adalora", None)
        if adalora is not None and self.before_step is not None:
            self.before_step.load_state(adalora)
        self.sampler.load_state(state)


class ClassifyTask(_ExampleTask):
    def __init__(self, data: Data, engine, dp_rank: int, dp_size: int, seed: int, weights: list[float] | None,
                 show=None):
        """`show`: where evaluate() prints its per-class table (Monitor.print: rank 0); None prints nothing."""
        import torch

        super().__init__(data, engine, dp_rank, dp_size, seed)
        self.labels = {split: label_ids(data, split) for split in data.splits}
        self.weight = torch.tensor(weights, dtype=torch.float32, device=self.device) if weights else None
        self.show = show

    def _batch(self, split: str, indices: list[int]) -> dict:
        from pipeline.data.tasks import pad_batch

        batch = pad_batch([self.data.splits[split].ids[i] for i in indices], self.pad_id)
        batch["labels"] = self.labels[split][indices]
        return self._tensors(batch)

    def loss(self, engine, batch: dict):
        import torch.nn.functional as F

        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, K)
        return F.cross_entropy(logits.float(), batch["labels"], weight=self.weight)

    def report(self, engine, split: str) -> dict:
        """Loss, accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix over the whole split,
        summed over ranks."""
        import torch
        import torch.nn.functional as F

        from pipeline.data.tasks import classification_report

        k = len(self.data.label_names)
        totals = torch.zeros(k * k + 1, dtype=torch.float64, device=self.device)  # confusion (true x pred), loss sum
        engine.eval()
        with torch.no_grad():
            for batch, weight in self._eval_batches(split):
                logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                if weight:
                    truth = batch["labels"]
                    pred = logits.argmax(-1)
                    totals[:k * k] += torch.bincount(truth * k + pred, minlength=k * k).double()
                    totals[-1] += F.cross_entropy(logits, truth, reduction="sum").double()
        engine.train()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        confusion = totals[:k * k].round().long().view(k, k).cpu().numpy()
        report = classification_report(confusion, self.data.label_names)
        report["loss"] = float(totals[-1] / max(1, report["examples"]))
        return report

    def evaluate(self, engine, split: str) -> dict[str, float]:
        """Loss, accuracy, macro-F1 and per-class precision_<label>/recall_<label> (the loop logs them as Eval/*)."""
        from pipeline.data.tasks import format_per_class

        r = self.report(engine, split)
        if self.show is not None:
            self.show(f"{split} per class:\n{format_per_class(r, self.data.label_names)}")
        metrics = {"loss": r["loss"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}
        for name, c in r["per_class"].items():
            metrics[f"precision_{name}"] = c["precision"]
            metrics[f"recall_{name}"] = c["recall"]
        return metrics


class SFTTask(_ExampleTask):
    def _batch(self, split: str, indices: list[int]) -> dict:
        from pipeline.data.tasks import pad_batch

        s = self.data.splits[split]
        return self._tensors(pad_batch([s.ids[i] for i in indices], self.pad_id, [s.labels[i] for i in indices]))

    def loss(self, engine, batch: dict):
        return engine(**batch).loss  # mean over the response tokens (labels -100 elsewhere); the model shifts

    def report(self, engine, split: str) -> dict:
        import torch

        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of loss x tokens, tokens)
        engine.eval()
        with torch.no_grad():
            for batch, weight in self._eval_batches(split):
                out = engine(**batch)
                tokens = float((batch["labels"][:, 1:] != -100).sum())
                if weight:
                    totals += torch.tensor([out.loss.float().item() * tokens, tokens], dtype=torch.float64,
                                           device=self.device)
        engine.train()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(totals[1])}

    def evaluate(self, engine, split: str) -> dict[str, float]:
        r = self.report(engine, split)
        return {"loss": r["loss"], "ppl": r["ppl"]}


# ---------------------------------------------------------------- model

def build_model(args: Args, data: Data, total_steps: int):
    """The model to train: --init with a fresh classification head (classify) or as a causal LM (sft),
    wrapped in LoRA/AdaLoRA adapters with --lora."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report: expected here, printed by the stage
    try:
        common = dict(dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False)
        if args.task == "classify":
            names = data.label_names
            model = AutoModelForSequenceClassification.from_pretrained(
                args.init, num_labels=len(names), id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)}, pad_token_id=data.tokenizer.pad_id,
                problem_type="single_label_classification",
                # --init may be a classifier of another number of labels (a finetune run's hf/): a new head then
                ignore_mismatched_sizes=True, **common)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.init, **common)
            model.config.pad_token_id = data.tokenizer.pad_id
            if model.generation_config is not None:
                model.generation_config.pad_token_id = data.tokenizer.pad_id
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.use_cache = False
    if args.lora:
        from pipeline import lora

        extra = lora.extra_trainable_modules(model) if args.task == "classify" else []
        config = lora.make_config("adalora" if args.adalora else "lora", "SEQ_CLS" if args.task == "classify"
                                  else "CAUSAL_LM", args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                                  total_steps, modules_to_save=extra or None)
        model = lora.apply(model, config)
    return model


def param_groups_of(model) -> list[dict]:
    from pipeline.pretrain import param_groups

    return [g for g in param_groups(model) if g["params"]]  # LoRA on a bias-free model has no 1-D trainables


def dry_run(args: Args, data: Data, model, ds_config: dict, world_size: int, steps: int) -> None:
    from pipeline.lora import count_parameters

    trainable, total = count_parameters(model)
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    print(f"model: {args.init} ({data.model_config.model_type}), {total:,} parameters, {trainable:,} trainable"
          + (" (LoRA)" if args.lora else ""))
    for name, split in data.splits.items():
        print(f"{name}: {len(split)} examples from {split.path}, {split.truncated} truncated at {data.max_length} "
              f"tokens, {split.dropped_empty} empty dropped")
    if data.label_names:
        print(f"labels: {', '.join(data.label_names)}")
    print(f"batch: train_batch_size {ds_config['train_batch_size']} = micro {micro} x accumulation {accum} x "
          f"data-parallel {world_size}; {steps} steps = "
          f"{steps * ds_config['train_batch_size'] / len(data.splits['train']):.2f} epochs")
    print(json.dumps(ds_config, indent=2))


# ---------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> dict:
    args = parse(Args, argv, __doc__)
    check_args(args)
    from pipeline import config as dsconf
    from pipeline.distributed import detect_accelerator

    # Everything that can be wrong with the inputs is found here, before any process group starts.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = detect_accelerator()
    data = load_data(args)
    raw = dsconf.load_ds_config(args.deepspeed_config)
    if "pipeline" in raw:
        raise ValueError(f"{args.deepspeed_config}: finetuning runs data parallel (ZeRO 0-3); drop the 'pipeline' block")
    probe, _ = dsconf.resolve_ds_config(raw, world_size=world_size, train_steps=1, output_dir=args.output,
                                        accelerator=accelerator, source=args.deepspeed_config)
    steps = steps_for(args, len(data.splits["train"]), probe["train_batch_size"])
    ds_config, warnings = dsconf.resolve_ds_config(raw, world_size=world_size, train_steps=steps,
                                                   output_dir=args.output, accelerator=accelerator,
                                                   source=args.deepspeed_config)
    if args.dry_run:
        for w in data.warnings + warnings:
            print(f"warning: {w}", file=sys.stderr)
        dry_run(args, data, build_model(args, data, steps), ds_config, world_size, steps)
        return {}
    return run(args, data, ds_config, data.warnings + warnings, steps)


def run(args: Args, data: Data, ds_config: dict, warnings: list[str], steps: int) -> dict:
    import deepspeed
    import torch
    from transformers.utils import logging as hf_logging

    from pipeline import config as dsconf
    from pipeline.data.tasks import class_weights, format_report
    from pipeline.distributed import return_freed_memory_under_zero3, setup, teardown
    from pipeline.export import export_hf
    from pipeline.files import write_json
    from pipeline.lora import AdaLoraUpdater, count_parameters
    from pipeline.lora import export as export_lora
    from pipeline.monitor import Monitor, peak_flops, training_flops_per_token
    from pipeline.training import LoopSettings, best_checkpoint, resume, train

    hf_logging.disable_progress_bar()  # per-rank loading/saving bars; the stage prints what matters
    dist = setup()
    return_freed_memory_under_zero3(ds_config)
    finished = False
    try:
        if dist.is_main:
            start_run_folder(args.output, ds_config, args, warnings)
        torch.manual_seed(args.seed)  # the same new head and adapters on every rank
        model = build_model(args, data, steps)
        if "activation_checkpointing" in ds_config:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if args.lora:
                model.enable_input_require_grads()
        trainable, total = count_parameters(model)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups_of(model), config=ds_config)
        train_batch = engine.train_batch_size()
        steps_per_epoch = max(1, math.ceil(len(data.splits["train"]) / train_batch))
        eval_interval = steps_per_epoch if args.eval_interval is None else args.eval_interval
        save_interval = eval_interval if args.save_interval is None else args.save_interval
        metric = args.metric_for_best or METRICS[args.task][0]
        length = max(1, round(data.mean_length))
        monitor = Monitor(engine, dist.is_main, training_flops_per_token(data.model_config, length),
                          peak_flops(dist.accelerator))
        weights = None
        if args.task == "classify":
            if args.class_weights == "balanced":
                weights = class_weights(label_ids(data, "train"), len(data.label_names))
            task = ClassifyTask(data, engine, dist.rank, dist.world_size, args.seed, weights, show=monitor.print)
        else:
            task = SFTTask(data, engine, dist.rank, dist.world_size, args.seed)
        if args.adalora:
            task.before_step = AdaLoraUpdater(engine.module)
        checkpoint_dir = os.path.join(args.output, "checkpoints")
        settings = LoopSettings(train_steps=steps, log_interval=args.log_interval, eval_interval=eval_interval,
                                save_interval=save_interval, keep_checkpoints=args.keep_checkpoints,
                                checkpoint_dir=checkpoint_dir, best_metric=metric,
                                higher_is_better=metric != "loss", patience=args.patience)
        monitor.print(f"{args.task}: {data.examples['train']} training examples, {steps} steps of {train_batch} "
                      f"({steps * train_batch / len(data.splits['train']):.2f} epochs), {trainable:,} of {total:,} "
                      f"parameters trainable" + (f", labels {', '.join(data.label_names)}" if data.label_names else ""))
        start = resume(engine, task, settings)
        if start:
            monitor.print(f"resumed from {checkpoint_dir} at step {start}")
        result = train(engine, task, settings, monitor, start)

        best = best_checkpoint(checkpoint_dir)
        if best is not None and best["step"] != result["steps"]:
            # The engine holds the last weights: bring back the best ones (the optimizer state comes along unused).
            path, client_state = engine.load_checkpoint(checkpoint_dir, tag=best["tag"])
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load the best checkpoint {checkpoint_dir}/{best['tag']}")
            task.load_state(client_state["data"])  # and its task state: under AdaLoRA, the rank pattern to export
            monitor.print(f"best {metric} {best['value']:.4f} at step {best['step']}: evaluating and exporting those "
                          "weights")
        reports = {split: task.report(engine, split) for split in data.splits if split != "train"}
        monitor.scalars(result["steps"], {f"Final/{split}_{k}": v for split, r in reports.items()
                                          for k, v in r.items() if isinstance(v, (int, float))})
        data.tokenizer.tok.model_max_length = data.max_length  # predict truncates where training did
        out = os.path.join(args.output, "hf")
        if args.lora:
            export_lora(engine, data.tokenizer, out, os.path.join(args.output, "adapter") if args.keep_adapters else None)
        else:
            export_hf(engine, data.tokenizer, out)

        summary = {"task": args.task, "steps": result["steps"], "train_loss": result["train_loss"],
                   "best_metric": metric, "best_value": best["value"] if best else None,
                   "best_step": best["step"] if best else None, "stopped_early": result.get("stopped_early", False),
                   "epochs": result["steps"] * train_batch / len(data.splits["train"]),
                   "examples": data.examples,
                   "truncated": {s: v.truncated for s, v in data.splits.items()},
                   "dropped_empty": {s: v.dropped_empty for s, v in data.splits.items()},
                   "max_length": data.max_length, "tokens_per_sec": result["tokens_per_sec"],
                   "grad_norm": result["grad_norm"], "precision": dsconf.precision_of(ds_config),
                   "zero_stage": dsconf.zero_stage_of(ds_config), "pipeline_stages": 1,
                   "world_size": dist.world_size, "train_batch_size": train_batch, "accelerator": dist.accelerator,
                   "init": args.init, "parameters": total, "trainable_parameters": trainable,
                   "lora": ("adalora" if args.adalora else "lora") if args.lora else None}
        for split, r in reports.items():
            for key, value in r.items():
                summary[f"{split}_{key}"] = value
        if args.task == "classify":
            summary["labels"] = data.label_names
            summary["class_weights"] = weights
            summary["dropped_unseen_label"] = {s: v.dropped_unseen_label for s, v in data.splits.items()}
        else:
            summary.update(template=data.template, packing=args.packing, eval_loss=reports["valid"]["loss"],
                           eval_ppl=reports["valid"]["ppl"], train_sequences=len(data.splits["train"]))
            summary["dropped_long_prompt"] = {s: v.dropped_long_prompt for s, v in data.splits.items()}
        if dist.is_main:
            write_json(os.path.join(args.output, "summary.json"), summary)
            if args.task == "classify":
                for split, r in reports.items():
                    monitor.print(f"== {split}\n{format_report(r, data.label_names)}")
            keys = [k for k in ("steps", "valid_accuracy", "valid_macro_f1", "test_accuracy", "test_macro_f1",
                                "valid_loss", "valid_ppl", "test_loss", "best_step") if k in summary]
            monitor.print(f"done: {json.dumps({k: summary[k] for k in keys})}")
        finished = True
        return summary
    finally:
        teardown(success=finished)


if __name__ == "__main__":
    run_main(main, "finetune")
