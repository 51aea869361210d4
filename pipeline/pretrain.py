"""Pretraining: a causal LM (Llama/GPT-2 style) or a masked LM (BERT style) on prepared token shards.

Everything about parallelism and precision (ZeRO stage, offload, bf16/fp16, batch sizes, optimizer,
LR schedule, clipping, monitoring) comes from the DeepSpeed JSON; the flags say what to train on
and for how long.

One process (debugging, a laptop):
    python -m pipeline.pretrain --data build/demo/data --model tiny --deepspeed_config ds_configs/zero0.json \
        --output runs/tiny --train-steps 200
One node, N ranks:
    deepspeed --num_gpus 2 pipeline/pretrain.py --data build/demo/data --model tiny \
        --deepspeed_config ds_configs/zero2.json --output runs/tiny --train-steps 200
Several nodes (see hostfiles/ and the README's multi-node section):
    deepspeed --hostfile hostfiles/two_nodes pipeline/pretrain.py ... (same flags)
Pipeline parallel (a config with a `pipeline` block, e.g. 2 stages x 2 data-parallel replicas on 4 ranks):
    deepspeed --num_gpus 4 pipeline/pretrain.py ... --deepspeed_config ds_configs/pipe2.json

Rerunning the same command resumes from RUN/checkpoints/latest. The run folder ends with
ds_config.json, args.json, summary.json, tensorboard/, checkpoints/ and hf/ (a HuggingFace model).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):  # `deepspeed pipeline/pretrain.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from pipeline.cli import arg, parse, run_main
from pipeline.files import check_output_folder, start_run_folder


@dataclass
class Args:
    data: list[str] = arg(help="prepared data folders (pipeline.prepare output); several are blended by --data-weights",
                          required=True, metavar="DIR")
    model: str = arg("tiny", help="a preset name (tiny, llama-125m, llama-350m, llama-1b, gpt2-tiny, gpt2-small, "
                                  "bert-tiny, bert-base, ...), a model config JSON, or a HF checkpoint folder to "
                                  "continue pretraining")
    deepspeed_config: str = arg(help="DeepSpeed JSON (ds_configs/*.json): ZeRO, precision, batch sizes, optimizer, "
                                     "scheduler, monitoring; \"auto\" values are filled by this stage",
                                required=True, flag="--deepspeed_config", aliases=("--deepspeed-config",),
                                metavar="JSON")
    output: str = arg(help="the run folder; rerunning with the same folder resumes from its last checkpoint",
                      required=True, metavar="RUN")
    train_steps: int = arg(help="stop after this many optimizer steps (also the LR schedule's length when the "
                                "JSON says \"auto\")", required=True)
    objective: str = arg("clm", help="clm: next-token prediction (decoders); mlm: masked LM, BERT's 15%% with 80/10/10 "
                                     "(encoders)", choices=["clm", "mlm"])
    seq_length: int = arg(256, help="tokens per training window; documents are packed with EOS separators")
    data_weights: list[float] = arg(help="one weight per --data folder for blending (default: equal)")
    seed: int = arg(1234, help="seed for weights, data order and masking")
    mlm_probability: float = arg(0.15, help="share of tokens masked for --objective mlm")
    log_interval: int = arg(10, help="optimizer steps between console lines and TensorBoard train scalars")
    eval_interval: int = arg(100, help="optimizer steps between validation runs (0: only at the end)")
    eval_batches: int = arg(20, help="micro-batches per rank in each validation run")
    save_interval: int = arg(100, help="optimizer steps between checkpoints, and one at the last step "
                                     "(0: no checkpoints: the run cannot be resumed or extended, only its hf/ export is written)")
    keep_checkpoints: int = arg(2, help="how many most recent checkpoints to keep")
    compile: bool = arg(False, help="compile the model with torch.compile (DeepSpeed's engine.compile) before the first "
                                    "step: element-wise work and precision casts fused into fewer kernels (bf16 "
                                    "gains most); the first step and the first evaluation wait for the compile, "
                                    "a minute or more")
    compile_backend: str = arg("inductor", help="torch.compile backend for --compile: inductor (generates kernels), "
                                                "aot_eager or eager (no code generation: to find graph breaks)",
                               choices=["inductor", "aot_eager", "eager"])
    dry_run: bool = arg(False, help="resolve the config, build the model on CPU, print parameters, batch arithmetic "
                                    "and the final DeepSpeed JSON, then exit without training")


def check_args(args: Args) -> None:
    """Flag errors that need no data and no process group."""
    check_output_folder(args.output)
    for name in ("train_steps", "seq_length", "log_interval", "eval_batches", "keep_checkpoints"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("eval_interval", "save_interval"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or positive, got {getattr(args, name)}")
    if args.data_weights is not None and len(args.data_weights) != len(args.data):
        raise ValueError(f"--data-weights has {len(args.data_weights)} values for {len(args.data)} --data folders")
    if not 0 < args.mlm_probability < 1:
        raise ValueError(f"--mlm-probability must be between 0 and 1, got {args.mlm_probability}")


def load_data_folders(folders: list[str]):
    """The tokenizer of the first folder. Every folder is opened and checked now, before any process group
    (manifest, tokenizer, shards: pipeline/data/prepared.py), and must have been prepared with the same tokenizer."""
    from pipeline.data.prepared import open_prepared

    opened = [open_prepared(folder, flag="--data") for folder in folders]
    fingerprints = [data.manifest["tokenizer"]["sha256"] for data in opened]
    if len(set(fingerprints)) > 1:
        raise ValueError(f"--data folders were prepared with different tokenizers ({dict(zip(folders, fingerprints))}); "
                         "prepare them all with the same --tokenizer")
    return opened[0].tokenizer


class PretrainTask:
    """Packed windows from the blended data; CLM labels are the inputs (the loss shifts them),
    MLM inputs are masked deterministically per sample number."""

    def __init__(self, args: Args, tokenizer, engine, dp_rank: int, dp_size: int):
        from pipeline.data import TokenShards
        from pipeline.data.packing import BlendedSampler, PackedWindows
        from pipeline.training import is_pipeline_engine

        self.args, self.tokenizer, self.device = args, tokenizer, engine.device
        self.pipelined = is_pipeline_engine(engine)
        self.micro = engine.train_micro_batch_size_per_gpu()
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.tokens_per_step = engine.train_batch_size() * args.seq_length
        windows = [PackedWindows(TokenShards(d, "train"), args.seq_length, tokenizer.eos_id) for d in args.data]
        self.sampler = BlendedSampler(windows, args.data_weights or [1.0] * len(windows), args.seed)
        self.eval_windows = {s: [PackedWindows(TokenShards(d, s), args.seq_length, tokenizer.eos_id) for d in args.data]
                             for s in ("valid", "test")}
        self.special = [i for i in tokenizer.special_ids().values() if i is not None]

    def _inputs(self, windows: list[np.ndarray], sample_numbers: list[int]) -> dict:
        import torch

        ids = np.stack(windows)  # (B, T)
        if self.args.objective == "clm":
            t = torch.from_numpy(ids).to(self.device)
            return {"input_ids": t, "labels": t}
        masked, labels = zip(*(self._mask(w, n) for w, n in zip(windows, sample_numbers)))
        return {"input_ids": torch.from_numpy(np.stack(masked)).to(self.device),
                "labels": torch.from_numpy(np.stack(labels)).to(self.device)}

    def _mask(self, window: np.ndarray, sample_number: int):
        from pipeline.data.packing import mask_for_mlm

        rng = np.random.default_rng([self.args.seed, sample_number])  # same masks after a resume
        return mask_for_mlm(window, rng, self.tokenizer.mask_id, self.tokenizer.vocab_size, self.special,
                            self.args.mlm_probability)

    def next_batch(self) -> dict:
        # Every rank walks the same global order and takes its own slice of each micro-step.
        samples = self.sampler.next_samples(self.micro * self.dp_size)
        mine = samples[self.dp_rank * self.micro:(self.dp_rank + 1) * self.micro]
        return self._inputs([self.sampler.datasets[i][w] for _, i, w in mine], [n for n, _, _ in mine])

    def loss(self, engine, batch: dict):
        # The model's logits, and the loss taken here: the HF model's own would copy all of them to fp32 first
        # (pipeline/models/cross_entropy.py). Same number, fewer passes over (B, T, V). Under --compile too, so
        # that a compiled run computes the numbers of an uncompiled one.
        from pipeline.models.cross_entropy import lm_loss

        return lm_loss(engine(input_ids=batch["input_ids"]).logits, batch["labels"], self.args.objective == "clm")

    def micro_batches(self):
        """For the pipeline engine: this replica's micro-batches as (input_ids, labels), endlessly."""
        while True:
            batch = self.next_batch()
            yield batch["input_ids"], batch["labels"]

    def evaluate(self, engine, split: str) -> dict[str, float]:
        """Mean loss over the first eval_batches x micro x dp windows of the split (all folders),
        weighted by label tokens; every rank runs the same number of forward passes (ZeRO-3 needs it)."""
        import torch

        pool = [(d, k) for d, ds in enumerate(self.eval_windows[split]) for k in range(len(ds))]
        pool = pool[:self.args.eval_batches * self.micro * self.dp_size]
        if not pool:
            return {}
        if self.pipelined:
            loss = self._pipeline_eval_loss(engine, split, pool)
            return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        mine = pool[self.dp_rank::self.dp_size]
        batches = math.ceil(math.ceil(len(pool) / self.dp_size) / self.micro)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of loss x tokens, tokens)
        engine.eval()
        with torch.no_grad():
            for b in range(batches):
                chunk = mine[b * self.micro:(b + 1) * self.micro]
                weight = len(chunk)
                chunk = chunk or pool[:1]  # a rank with nothing left still joins the collective forward
                windows = [self.eval_windows[split][d][k] for d, k in chunk]
                batch = self._inputs(windows, [10**12 + d * 10**9 + k for d, k in chunk])  # fixed eval masks
                loss = self.loss(engine, batch)
                n_labels = float((batch["labels"][:, 1:] != -100).sum() if self.args.objective == "clm"
                                 else (batch["labels"] != -100).sum())
                if weight:
                    totals += torch.tensor([loss.item() * n_labels, n_labels], dtype=torch.float64,
                                           device=self.device)
        engine.train()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    def _pipeline_eval_loss(self, engine, split: str, pool: list[tuple[int, int]]) -> float:
        """The same token-weighted mean as the plain path, through engine.eval_batch: it averages the
        micro-batch losses over micro-batches and replicas, so each micro-batch's loss is its summed
        token loss / n (labels passed as (labels, n)), n = label tokens of the pool / (micro-batches x
        replicas). Every micro-batch is full (the pipeline's buffers have one shape): a short one is
        padded with windows whose labels are all -100, which add nothing."""
        import torch

        mine = pool[self.dp_rank::self.dp_size]
        batches = math.ceil(math.ceil(len(pool) / self.dp_size) / self.micro)
        n = torch.tensor(len(pool) * (self.args.seq_length - 1) / (batches * self.dp_size), dtype=torch.float32)

        def micro_batches():
            for b in range(batches):
                chunk = mine[b * self.micro:(b + 1) * self.micro]
                windows = [self.eval_windows[split][d][k] for d, k in chunk + pool[:1] * (self.micro - len(chunk))]
                ids = torch.from_numpy(np.stack(windows)).to(self.device)
                labels = ids.clone()
                labels[len(chunk):] = -100
                yield ids, (labels, n)

        return float(engine.eval_batch(micro_batches(), num_micro_batches=batches))

    def state(self) -> dict:
        return self.sampler.state()

    def load_state(self, state: dict) -> None:
        self.sampler.load_state(state)


def dry_run(args: Args, model, ds_config: dict, world_size: int) -> None:
    params = sum(p.numel() for p in model.parameters())
    stages = ds_config.get("pipeline", {}).get("stages", 1)
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    dp = world_size // (stages if isinstance(stages, int) else 1)
    print(f"model: {args.model} ({model.config.model_type}), {params:,} parameters, objective {args.objective}")
    print(f"batch: train_batch_size {ds_config['train_batch_size']} = micro {micro} x accumulation {accum} x "
          f"data-parallel {dp} (world {world_size}); {ds_config['train_batch_size'] * args.seq_length:,} tokens/step")
    if stages != 1:
        from pipeline.models.pipe import describe_stages

        print(f"pipeline: {stages} stages x {dp} data-parallel replicas, partition "
              f"{ds_config['pipeline'].get('partition', 'parameters')!r}\n{describe_stages(model, ds_config)}")
    print(json.dumps(ds_config, indent=2))


def main(argv: list[str] | None = None) -> dict:
    args = parse(Args, argv, __doc__)
    check_args(args)
    from pipeline import config as dsconf
    from pipeline.distributed import detect_accelerator
    from pipeline.models import build_model, check_objective, load_model_config, max_positions

    # Everything that can be wrong with the inputs is found here, before any process group starts.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = detect_accelerator()
    tokenizer = load_data_folders(args.data)
    special = {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    model_config, checkpoint = load_model_config(args.model, tokenizer.vocab_size, special)
    if checkpoint is not None:
        from pipeline.data.prepared import check_model_tokenizer

        check_model_tokenizer(checkpoint, tokenizer, "--model", f"the tokenizer of --data {args.data[0]}",
                              f"prepare the data with the model's (`python -m pipeline.prepare --tokenizer {checkpoint} "
                              "...`), or train a fresh model (a preset) on it")
    check_objective(model_config, args.objective, args.model)
    limit = max_positions(model_config)
    if limit is not None and args.seq_length > limit:
        raise ValueError(f"--seq-length {args.seq_length} is above the model's maximum of {limit} positions")
    from pipeline.data.packing import check_windows

    window_warnings = check_windows(args.data, args.seq_length, tokenizer.eos_id)
    if args.objective == "mlm" and tokenizer.mask_id is None:
        raise ValueError(f"--objective mlm needs a mask token; the tokenizer of {args.data[0]} has none")
    ds_config, warnings = dsconf.resolve_ds_config(dsconf.load_ds_config(args.deepspeed_config), world_size=world_size,
                                                   train_steps=args.train_steps, output_dir=args.output,
                                                   accelerator=accelerator, source=args.deepspeed_config)
    warnings += window_warnings
    if dsconf.pipeline_stages_of(ds_config) > 1:
        if args.compile:
            raise ValueError(f"--compile does not apply to a pipelined model ({args.deepspeed_config} has a pipeline "
                             "block with stages > 1): DeepSpeed's pipeline engine runs each stage's layers itself")
        from pipeline.models.pipe import check_pipeline

        check_pipeline(model_config, args.objective, ds_config)
        if "activation_checkpointing" in ds_config and not ds_config["pipeline"].get("activation_checkpoint_interval"):
            warnings.append("the 'activation_checkpointing' block does not apply to a pipelined model; set "
                            "pipeline.activation_checkpoint_interval (layers per checkpointed chunk) instead")
    if args.compile and dsconf.zero_stage_of(ds_config) == 3:
        warnings.append("--compile with ZeRO-3: DeepSpeed's parameter gathering breaks the compiled graph at every "
                        "layer, so steps gain little or lose; ZeRO-1/2 compile the model as one graph")
    if args.dry_run:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        dry_run(args, build_model(args.model, args.objective, tokenizer.vocab_size, special), ds_config, world_size)
        return {}
    return run(args, ds_config, warnings, tokenizer, special, model_config)


def run(args: Args, ds_config: dict, warnings: list[str], tokenizer, special: dict, model_config) -> dict:
    import deepspeed
    import torch

    from pipeline import config as dsconf
    from pipeline.distributed import return_freed_memory_under_zero3, setup, teardown
    from pipeline.export import export_hf
    from pipeline.models import build_model
    from pipeline.monitor import Monitor, peak_flops, training_flops_per_token, write_json
    from pipeline.training import LoopSettings, resume, resume_config, train

    dist = setup()
    return_freed_memory_under_zero3(ds_config)
    finished = False
    try:
        if dist.is_main:
            start_run_folder(args.output, ds_config, args, warnings)
        torch.manual_seed(args.seed)
        model = build_model(args.model, args.objective, tokenizer.vocab_size, special)
        pipelined = dsconf.pipeline_stages_of(ds_config) > 1
        if pipelined:
            # The same HF modules (same seed, same initial weights), wrapped as pipeline layers; each
            # rank keeps its stage's layers. Data parallelism is within a stage: rank and size from the grid.
            from pipeline.models.pipe import build_pipeline_module

            trained = build_pipeline_module(model, ds_config)
        else:
            trained = model
            if "activation_checkpointing" in ds_config:
                # The JSON's block turns it on: each decoder layer's activations are recomputed in backward.
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                if dist.is_main:
                    print("activation checkpointing: on (every decoder layer recomputed in backward)", flush=True)
        ds_config = resume_config(ds_config, os.path.join(args.output, "checkpoints"))
        engine, _, _, _ = deepspeed.initialize(model=trained, model_parameters=param_groups(trained), config=ds_config)
        if args.compile:
            # In place (module.compile): checkpoints and the HF export keep the model's own parameter names.
            engine.compile(backend=args.compile_backend)
            if dist.is_main:
                print(f"torch.compile: on ({args.compile_backend}); the first step waits for the compile", flush=True)
        dp_rank, dp_size = ((engine.grid.data_parallel_id, engine.grid.data_parallel_size) if pipelined
                            else (dist.rank, dist.world_size))
        task = PretrainTask(args, tokenizer, engine, dp_rank=dp_rank, dp_size=dp_size)
        settings = LoopSettings(train_steps=args.train_steps, log_interval=args.log_interval,
                                eval_interval=args.eval_interval, save_interval=args.save_interval,
                                keep_checkpoints=args.keep_checkpoints,
                                checkpoint_dir=os.path.join(args.output, "checkpoints"))
        monitor = Monitor(engine, dist.is_main, training_flops_per_token(model_config, args.seq_length),
                          peak_flops(dist.accelerator))
        start = resume(engine, task, settings)
        if start:
            monitor.print(f"resumed from {settings.checkpoint_dir} at step {start}")
        result = train(engine, task, settings, monitor, start)
        evals = {f"{split}_{k}": v for split in ("valid", "test") for k, v in task.evaluate(engine, split).items()}
        monitor.scalars(result["steps"], {f"Eval/{k}": v for k, v in evals.items() if k.startswith("valid_")})
        export_hf(engine, tokenizer, os.path.join(args.output, "hf"), hf_model=model)
        summary = {"steps": result["steps"], "train_loss": result["train_loss"],
                   "eval_loss": evals.get("valid_loss"), "eval_ppl": evals.get("valid_ppl"),
                   "test_loss": evals.get("test_loss"), "test_ppl": evals.get("test_ppl"),
                   "tokens_per_sec": result["tokens_per_sec"], "grad_norm": result["grad_norm"],
                   "precision": dsconf.precision_of(ds_config), "zero_stage": dsconf.zero_stage_of(ds_config),
                   "pipeline_stages": dsconf.pipeline_stages_of(ds_config), "world_size": dist.world_size,
                   "parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()),
                   "objective": args.objective, "model": args.model, "seq_length": args.seq_length,
                   "train_batch_size": engine.train_batch_size(), "accelerator": dist.accelerator}
        if dist.is_main:
            write_json(os.path.join(args.output, "summary.json"), summary)
            monitor.print(f"done: {json.dumps({k: summary[k] for k in ('steps', 'train_loss', 'eval_loss', 'eval_ppl', 'tokens_per_sec')})}")
        finished = True
        return summary
    finally:
        teardown(success=finished)


def param_groups(model) -> list[dict]:
    """No weight decay on biases, norms and embeddings-sized vectors (1-D parameters); the decay
    value itself comes from the JSON's optimizer block."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


if __name__ == "__main__":
    run_main(main, "pretrain")
