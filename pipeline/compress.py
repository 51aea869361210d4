"""Compression: make a finetuned (or pretrained) model smaller and faster on CPU, keeping its quality.

The DeepSpeed JSON is a normal DeepSpeed config plus a `compression` block (ds_configs/compression/),
which this stage sets aside before `deepspeed.initialize` and applies itself (pipeline/compression/:
quantization-aware training, post-training quantization, sparse/head/row pruning, layer reduction with
knowledge distillation from a frozen copy of the uncompressed model on each rank). Training runs through
the shared loop; at the end the compression is made real and the run folder gets:

    RUN/hf/          the cleaned float model: save_pretrained format, loads with plain transformers
    RUN/compressed/  integer weights + scales, every cut made: pipeline.compression.load_compressed(path)
    RUN/summary.json params, bytes on disk, task metric and CPU latency per batch, before and after

A classifier (pipeline.finetune's output; the data flags are finetune's):
    python -m pipeline.compress --task classify --init runs/sentiment/hf --train data/sentiment/train.jsonl \\
        --valid data/sentiment/valid.jsonl --test data/sentiment/test.jsonl --text-key text --label-key label \\
        --deepspeed_config ds_configs/compression/int8_qat.json --output runs/sentiment-int8 --train-steps 100
A language model (pipeline.pretrain's output and its prepared data):
    python -m pipeline.compress --task lm --init runs/tiny/hf --data build/demo/data --seq-length 128 \\
        --deepspeed_config ds_configs/compression/half_layers_kd.json --output runs/tiny-half --train-steps 200
One node, N ranks (ZeRO 0-2):
    deepspeed --num_gpus 2 pipeline/compress.py ... (same flags)
Several nodes: deepspeed --hostfile hostfiles/two_nodes pipeline/compress.py ... (same flags)

Post-training quantization alone (ds_configs/compression/int8_ptq.json) needs no training: leave out
--train-steps. Rerunning the same command resumes from RUN/checkpoints/latest.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

if __package__ in (None, ""):  # `deepspeed pipeline/compress.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import arg, parse, run_main
from pipeline.files import check_output_folder, start_run_folder


@dataclass
class Args:
    init: str = arg(help="the model to compress: a HF folder (a finetune run's hf/ for --task classify, a pretrain "
                         "run's hf/ for --task lm)", required=True, metavar="HF_DIR")
    deepspeed_config: str = arg(help="DeepSpeed JSON with a \"compression\" block (ds_configs/compression/*.json)",
                                required=True, flag="--deepspeed_config", aliases=("--deepspeed-config",),
                                metavar="JSON")
    output: str = arg(help="the run folder; rerunning with the same folder resumes from its last checkpoint",
                      required=True, metavar="RUN")
    task: str = arg(help="lm: a language model on prepared token shards (--data); classify: a text classifier "
                         "on labelled files (--train/--valid/--test) (default: classify when --train, --valid or --test is "
                         "given without --data, else lm)", choices=["lm", "classify"])
    data: list[str] = arg(help="lm: prepared data folders (pipeline.prepare output)", metavar="DIR")
    seq_length: int = arg(256, help="lm: tokens per window")
    train: str = arg(help="classify: training file (jsonl, csv/tsv, parquet, HF dataset folder)", metavar="F")
    valid: str = arg(help="classify: validation file", metavar="F")
    test: str = arg(help="classify: test file; gives test_accuracy_before/_after", metavar="F")
    text_key: str = arg("text", help="classify: the field holding the text")
    label_key: str = arg("label", help="classify: the field holding the label")
    max_length: int = arg(help="classify: tokens per example (default: the --max-length the classifier was finetuned "
                               "with, as its tokenizer records it; else 512 or the model's maximum)")
    unseen_labels: str = arg("error", help="classify: a valid/test label that the training data lacks stops the run "
                                           "(error) or its examples are left out (drop), as in pipeline.finetune",
                             choices=["error", "drop"])
    train_steps: int = arg(0, help="optimizer steps of compression training (also the LR schedule's length when the "
                                   "JSON says \"auto\"); 0 only for post-training quantization")
    seed: int = arg(1234, help="seed for data order, masking and dropout")
    log_interval: int = arg(10, help="optimizer steps between console lines and TensorBoard train scalars")
    eval_interval: int = arg(100, help="optimizer steps between validation runs (0: only at the end)")
    eval_batches: int = arg(20, help="lm: micro-batches per rank in each validation run")
    save_interval: int = arg(100, help="optimizer steps between checkpoints, and one at the last step "
                                     "(0: no checkpoints: the run cannot be resumed, only its exports are written)")
    keep_checkpoints: int = arg(2, help="how many most recent checkpoints to keep")
    latency_repeats: int = arg(10, help="timed forward passes per model for the CPU latency (the median is reported)")
    runtime: str = arg("auto", help="kernel for the compressed model's metric and latency: int8 (dynamic int8 CPU "
                                    "kernel), float (dequantized weights: the numbers training used), auto (int8 "
                                    "where available, float on GPU)", choices=["auto", "int8", "float"])
    dry_run: bool = arg(False, help="check the config against the model, print what each method selects, the batch "
                                    "arithmetic and the DeepSpeed JSON, then exit")


def check_args(args: Args) -> None:
    """Flag errors that need no data and no process group."""
    check_output_folder(args.output)
    if args.task is None:  # finetune's data flags alone (--train/--valid/--test) say it is a classifier
        given_classify = args.train is not None or args.valid is not None or args.test is not None
        args.task = "classify" if given_classify and not args.data else "lm"
    for name in ("seq_length", "log_interval", "eval_batches", "keep_checkpoints", "latency_repeats"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("train_steps", "eval_interval", "save_interval"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or positive, got {getattr(args, name)}")
    lm_flags, classify_flags = ("data",), ("train", "valid", "test", "max_length")
    wrong = [f for f in (classify_flags if args.task == "lm" else lm_flags) if getattr(args, f) is not None]
    if wrong:
        raise ValueError(f"--{wrong[0].replace('_', '-')} does not apply to --task {args.task}")
    if args.task == "lm" and args.unseen_labels != "error":
        raise ValueError("--unseen-labels applies to --task classify only")
    if args.task == "lm" and not args.data:
        raise ValueError("--task lm needs --data DIR (a prepared data folder)")
    if args.task == "classify" and (args.train is None or args.valid is None):
        raise ValueError("--task classify needs --train F and --valid F (and --test F for test_accuracy)")


# ---------------------------------------------------------------- inputs, read and checked before any process starts

@dataclass
class Inputs:
    model: object            # the uncompressed model, float32 on CPU
    tokenizer: object        # saved with the outputs
    make_task: object        # (engine, dp_rank, dp_size) -> a pipeline.training Task
    model_config: object
    warnings: list[str] = field(default_factory=list)  # about the data (truncated, dropped), printed once at the start


def load_inputs(args: Args) -> Inputs:
    if not os.path.isfile(os.path.join(args.init, "config.json")):
        raise FileNotFoundError(f"--init {args.init}: no config.json; expected a HuggingFace model folder")
    return _lm_inputs(args) if args.task == "lm" else _classify_inputs(args)


def _lm_inputs(args: Args) -> Inputs:
    from transformers import AutoConfig

    from pipeline import pretrain
    from pipeline.data.prepared import check_model_tokenizer
    from pipeline.models import build_model, max_positions
    from pipeline.models.presets import ENCODERS

    objective = "mlm" if AutoConfig.from_pretrained(args.init, trust_remote_code=False).model_type in ENCODERS else "clm"
    tokenizer = pretrain.load_data_folders(args.data)
    check_model_tokenizer(args.init, tokenizer, "--init", f"the tokenizer of --data {args.data[0]}",
                          "compress with the data the model was trained on (or data prepared with "
                          f"`python -m pipeline.prepare --tokenizer {args.init} ...`)")
    special = {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    model = build_model(args.init, objective, tokenizer.vocab_size, special)
    limit = max_positions(model.config)
    if limit is not None and args.seq_length > limit:
        raise ValueError(f"--seq-length {args.seq_length} is above the model's maximum of {limit} positions")
    pargs = pretrain.Args(data=args.data, model=args.init, deepspeed_config=args.deepspeed_config, output=args.output,
                          train_steps=max(1, args.train_steps), objective=objective, seq_length=args.seq_length,
                          seed=args.seed, eval_batches=args.eval_batches)

    def make_task(engine, dp_rank: int, dp_size: int):
        return pretrain.PretrainTask(pargs, tokenizer, engine, dp_rank=dp_rank, dp_size=dp_size)

    return Inputs(model, tokenizer, make_task, model.config)


def _classify_inputs(args: Args) -> Inputs:
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipeline import finetune

    fargs = finetune.Args(task="classify", train=args.train, valid=args.valid, test=args.test, init=args.init,
                          deepspeed_config=args.deepspeed_config, output=args.output, text_key=args.text_key,
                          label_key=args.label_key, max_length=args.max_length or finetuned_max_length(args.init),
                          unseen_labels=args.unseen_labels, seed=args.seed)
    data = finetune.load_data(fargs)
    if not any(a.endswith("ForSequenceClassification") for a in (data.model_config.architectures or [])):
        raise ValueError(f"--init {args.init} is not a sequence classifier ({data.model_config.architectures}); "
                         "compress the hf/ folder of a pipeline.finetune --task classify run")
    model = AutoModelForSequenceClassification.from_pretrained(args.init, dtype=torch.float32, attn_implementation="sdpa",
                                                               trust_remote_code=False)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if names != data.label_names:
        raise ValueError(f"--init {args.init} predicts the labels {names}, the data has {data.label_names}; compress "
                         "a classifier finetuned on this data")
    model.config.use_cache = False
    data.tokenizer.tok.model_max_length = data.max_length

    def make_task(engine, dp_rank: int, dp_size: int):
        return finetune.ClassifyTask(data, engine, dp_rank, dp_size, args.seed, None)

    return Inputs(model, data.tokenizer, make_task, model.config, data.warnings)


def finetuned_max_length(init: str) -> int | None:
    """The --max-length a pipeline.finetune classifier was trained with: its export records it as the tokenizer's
    model_max_length (where predict truncates too). None when the folder records no usable one (transformers
    writes a huge number for "no limit"), or one beyond the model's positions."""
    from pipeline.models import max_positions

    try:
        with open(os.path.join(init, "tokenizer_config.json"), encoding="utf-8") as f:
            value = json.load(f).get("model_max_length")
        with open(os.path.join(init, "config.json"), encoding="utf-8") as f:
            limit = max_positions(SimpleNamespace(**json.load(f)))
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= (limit or 10**6):
        return None
    return value


def load_compression(path: str):
    """(DeepSpeed config without the block, parsed compression config), or a clear error."""
    from pipeline import config as dsconf
    from pipeline.compression import parse_compression

    raw = dsconf.load_ds_config(path)
    ds_raw, block = dsconf.split_compression(raw)
    if block is None:
        raise ValueError(f"{path} has no \"compression\" block; use one of ds_configs/compression/*.json "
                         "(or add the block to this config)")
    if "pipeline" in ds_raw:
        raise ValueError(f"{path}: compression runs data parallel (ZeRO 0-2); drop the 'pipeline' block")
    if dsconf.zero_stage_of(ds_raw) == 3:
        raise ValueError(f"{path}: ZeRO stage 3 partitions the weights that pruning ranks and quantization scales "
                         "read every step; use ZeRO stage 0, 1 or 2 for compression")
    return ds_raw, parse_compression(block, where=f"{path}: compression")


# ---------------------------------------------------------------- measuring

class ModelRunner:
    """What a Task's evaluation and construction use of the DeepSpeed engine, around a plain model that
    stays in eval mode (the uncompressed model, the loaded compressed one, or the student when nothing
    trains)."""

    def __init__(self, module, device, ds_config: dict):
        self.module, self.device = module.eval(), device
        self._micro, self._train = ds_config["train_micro_batch_size_per_gpu"], ds_config["train_batch_size"]

    def __call__(self, **batch):
        return self.module(**batch)

    def eval(self):
        return self

    def train(self):  # Task.evaluate switches back to training mode: this model never trains
        return self

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._micro

    def train_batch_size(self) -> int:
        return self._train


def cpu_latency_ms(models: dict, batch: dict, repeats: int) -> dict[str, float]:
    """Median wall time of one forward pass over `batch` on the CPU, in milliseconds, per model. The
    models take turns (after 2 untimed passes each), so a change in machine load hits all alike."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for i in range(repeats + 2):
            for name, model in models.items():
                start = time.perf_counter()
                model.eval()(**batch)
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def count_params(model) -> tuple[int, int]:
    """(parameters, non-zero parameters), each shared tensor once."""
    seen, total, nonzero = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            nonzero += int((p != 0).sum())
    return total, nonzero


def fp32_bytes(model, scratch: str) -> int:
    """Bytes of the model saved as float32 safetensors (save_pretrained), measured on disk."""
    from pipeline.compression import weight_bytes

    shutil.rmtree(scratch, ignore_errors=True)
    model.save_pretrained(scratch, safe_serialization=True)
    try:
        return weight_bytes(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def metric_keys(task: str) -> tuple[str, ...]:
    return ("loss", "ppl") if task == "lm" else ("loss", "accuracy", "macro_f1")


def evaluate(task, runner, splits: list[str], keys: tuple[str, ...], lm: bool) -> dict[str, float]:
    """`{split}_{metric}` over the splits (every rank takes part); a language model's "valid" is also
    reported as "eval" (eval_ppl, as pretraining names it)."""
    out = {}
    for split in splits:
        for key, value in task.evaluate(runner, split).items():
            if key in keys:
                out[f"{split}_{key}"] = value
                if split == "valid" and lm:
                    out[f"eval_{key}"] = value
    return out


# ---------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> dict:
    args = parse(Args, argv, __doc__)
    check_args(args)
    from pipeline import config as dsconf
    from pipeline.compression import prepare
    from pipeline.distributed import detect_accelerator

    # Everything that can be wrong with the inputs is found here, before any process group starts.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = detect_accelerator()
    ds_raw, compression = load_compression(args.deepspeed_config)
    if compression.needs_training and args.train_steps == 0:
        raise ValueError(f"{', '.join(compression.needs_training)} train the model: give --train-steps N "
                         "(post_training_quantization alone needs none)")
    ds_config, warnings = dsconf.resolve_ds_config(ds_raw, world_size=world_size, train_steps=max(1, args.train_steps),
                                                   output_dir=args.output, accelerator=accelerator,
                                                   source=args.deepspeed_config)
    inputs = load_inputs(args)
    warnings += inputs.warnings
    student = copy.deepcopy(inputs.model)
    compressor = prepare(student, compression)  # pattern and ratio errors name the config key
    for method in compression.grouped:
        offset = getattr(method, "schedule_offset", 0)
        if args.train_steps and offset >= args.train_steps:
            warnings.append(f"{method.name}.schedule_offset {offset} is not before --train-steps {args.train_steps}: "
                            "it is applied at the end, without training after it")
    if args.dry_run:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        params, _ = count_params(inputs.model)
        print(f"model: {args.init} ({inputs.model_config.model_type}), {params:,} parameters; "
              f"student: {count_params(student)[0]:,} parameters before cuts")
        print(f"methods: {', '.join(compression.enabled)}")
        print(compressor.plan.describe())
        print(f"batch: train_batch_size {ds_config['train_batch_size']} = micro {ds_config['train_micro_batch_size_per_gpu']}"
              f" x accumulation {ds_config['gradient_accumulation_steps']} x data-parallel {world_size}")
        print(json.dumps(ds_config, indent=2))
        return {}
    return run(args, ds_config, warnings, inputs, student, compressor)


def run(args: Args, ds_config: dict, warnings: list[str], inputs: Inputs, student, compressor) -> dict:
    import torch

    from pipeline import config as dsconf
    from pipeline.compression import CompressionTask, clean, load_compressed, save_compressed, weight_bytes
    from pipeline.distributed import barrier, return_freed_memory_under_zero3, setup, teardown
    from pipeline.export import save_hf
    from pipeline.monitor import Monitor, peak_flops, training_flops_per_token, write_json
    from pipeline.pretrain import param_groups
    from pipeline.training import LoopSettings, resume, train

    dist = setup()
    return_freed_memory_under_zero3(ds_config)
    finished = False
    compression = compressor.config
    try:
        if dist.is_main:
            start_run_folder(args.output, ds_config, args, warnings)
        torch.manual_seed(args.seed)
        device = torch.device("cuda", dist.local_rank) if dist.accelerator == "cuda" else torch.device("cpu")
        original = inputs.model.to(device).eval().requires_grad_(False)  # the baseline, and the frozen teacher
        splits = ["valid"] + (["test"] if args.task == "lm" or args.test else [])
        keys = metric_keys(args.task)

        engine, monitor = None, None
        if args.train_steps > 0:
            import deepspeed

            engine, _, _, _ = deepspeed.initialize(model=student, model_parameters=param_groups(student),
                                                   config=ds_config)
        runner = engine or ModelRunner(student.to(device), device, ds_config)
        task = inputs.make_task(runner, dist.rank, dist.world_size)
        if engine is not None:
            seq = args.seq_length if args.task == "lm" else max(1, round(task.data.mean_length))
            monitor = Monitor(engine, dist.is_main, training_flops_per_token(student.config, seq),
                              peak_flops(dist.accelerator))

        def say(text: str) -> None:
            if dist.is_main:
                print(text, flush=True)

        say(f"compress: {', '.join(compression.enabled)} on {args.init} ({inputs.model_config.model_type})\n"
            + compressor.plan.describe())
        before = evaluate(task, ModelRunner(original, device, ds_config), splits, keys, args.task == "lm")
        probe = inputs.make_task(runner, 0, 1).next_batch()  # a training-shaped batch for timing, from its own sampler
        timing_batch = {k: v.cpu() for k, v in probe.items() if k != "labels"}
        if compression.knowledge_distillation is None:
            inputs.model.cpu()  # no teacher: the accelerator's memory is the student's

        result = {"steps": 0, "train_loss": None, "tokens_per_sec": None}
        if engine is not None:
            ctask = CompressionTask(task, compressor, compression, teacher=original,
                                    teacher_layers=_layers(inputs.model_config), log=say)
            settings = LoopSettings(train_steps=args.train_steps, log_interval=args.log_interval,
                                    eval_interval=args.eval_interval, save_interval=args.save_interval,
                                    keep_checkpoints=args.keep_checkpoints,
                                    checkpoint_dir=os.path.join(args.output, "checkpoints"))
            start = resume(engine, ctask, settings)
            if start:
                say(f"resumed from {settings.checkpoint_dir} at step {start}")
            result = train(engine, ctask, settings, monitor, start)

        # Make it real (rank 0 writes; the others wait), then measure what was written.
        hf_dir, compressed_dir = os.path.join(args.output, "hf"), os.path.join(args.output, "compressed")
        sizes: dict = {}
        if dist.is_main:
            cleaned = clean(engine.module if engine else student, compressor)
            save_hf(cleaned.hf_model, inputs.tokenizer, hf_dir)
            save_compressed(cleaned.model, cleaned.storage, compressed_dir, inputs.tokenizer,
                            extra={"methods": compression.enabled, "notes": cleaned.notes})
            for note in cleaned.notes:
                say(f"note: {note}")
            params_after, nonzero_after = count_params(cleaned.model)
            sizes = {"params_after": params_after, "nonzero_params_after": nonzero_after,
                     "bytes_before": fp32_bytes(inputs.model.cpu(), os.path.join(args.output, "before.tmp")),
                     "bytes_after": weight_bytes(compressed_dir), "bytes_after_hf": weight_bytes(hf_dir),
                     "notes": cleaned.notes}
        barrier()
        runtime = args.runtime if args.runtime != "auto" or device.type == "cpu" else "float"
        compressed = load_compressed(compressed_dir, runtime=runtime)
        after = evaluate(task, ModelRunner(compressed.to(device), device, ds_config), splits, keys,
                         args.task == "lm")

        params_before, _ = count_params(inputs.model)
        summary = {"task": args.task, "init": args.init, "methods": compression.enabled, "steps": result["steps"],
                   "train_loss": result["train_loss"], "tokens_per_sec": result["tokens_per_sec"],
                   "params_before": params_before, **sizes,
                   **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
                   "runtime": _runtime_of(compressed),
                   "precision": dsconf.precision_of(ds_config), "zero_stage": dsconf.zero_stage_of(ds_config),
                   "world_size": dist.world_size, "accelerator": dist.accelerator}
        if dist.is_main:
            timed = compressed.cpu() if device.type == "cpu" else load_compressed(compressed_dir, runtime=args.runtime)
            latency = cpu_latency_ms({"before": inputs.model.cpu(), "after": timed}, timing_batch, args.latency_repeats)
            summary.update(latency_ms_before=latency["before"], latency_ms_after=latency["after"],
                           latency_batch=list(timing_batch["input_ids"].shape), latency_threads=torch.get_num_threads())
            summary["compression_ratio"] = summary["bytes_before"] / summary["bytes_after"]
            write_scalars(args.output, monitor, result["steps"], summary)
            write_json(os.path.join(args.output, "summary.json"), summary)
            say(report_table(summary))
        finished = True
        return summary
    finally:
        teardown(success=finished)


def write_scalars(output: str, monitor, step: int, summary: dict) -> None:
    """The before/after numbers as TensorBoard scalars `Compress/*` (through the engine's monitor, or a
    writer of its own when nothing trained)."""
    values = {f"Compress/{k}": float(v) for k, v in summary.items() if k.endswith(("_before", "_after"))
              and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if monitor is not None:
        monitor.scalars(step, values)
        return
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(os.path.join(output, "tensorboard")) as writer:
        for name, value in values.items():
            writer.add_scalar(name, value, step)


def _layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def _runtime_of(model) -> str:
    from pipeline.compression.runtime import QuantLinear

    kinds = {m.runtime for m in model.modules() if isinstance(m, QuantLinear)}
    return kinds.pop() if len(kinds) == 1 else "float"


def report_table(summary: dict) -> str:
    """The before/after table printed at the end of a run."""
    rows = [("parameters", "params_before", "params_after", "{:,}"),
            ("bytes on disk", "bytes_before", "bytes_after", "{:,}"),
            ("CPU latency per batch (ms)", "latency_ms_before", "latency_ms_after", "{:.1f}")]
    metrics = ("eval_ppl", "test_ppl") if summary["task"] == "lm" else ("valid_accuracy", "test_accuracy")
    rows += [(m, f"{m}_before", f"{m}_after", "{:.4f}") for m in metrics if f"{m}_before" in summary]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'before':>14}  {'after':>14}"]
    for label, b, a, fmt in rows:
        value = [summary.get(b), summary.get(a)]
        text = [fmt.format(v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else "-"
                for v in value]
        lines.append(f"{label:<{width}}  {text[0]:>14}  {text[1]:>14}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main, "compress")
