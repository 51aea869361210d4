"""Our training step against the HF Trainer's and a plain torch loop's, alternating step by step in one process.

    deepspeed --num_gpus 2 tools/step_ab.py --model-config tiny --deepspeed-config ds_configs/zero2.json
    python tools/step_ab.py --model-config tiny --deepspeed-config ds_configs/zero2.json   # adds `torch`

On a shared machine whose speed comes and goes for seconds at a time, separate runs of a few seconds each
measure the machine as much as the step (tools/benchmark.py's throughput section, medians of interleaved
rounds). Here every rank holds the arms side by side, on copies of one model with the same initial weights, and
takes one step of each in turn (A B A B ..., B A B A ... on odd steps), so that a slow spell hits them alike;
the medians of the per-step times are compared. Each arm is what its program runs for one optimizer step:

  ours   pipeline.pretrain's step: the model as build_model makes it (the CPU bf16 kernel rule), the DeepSpeed
         JSON as resolve_ds_config makes it (fused torch AdamW on CPU), two parameter groups, the loss taken by
         lm_loss from the logits; engine(), engine.backward(), engine.step()
  hf     the HF Trainer's step on the same DeepSpeed JSON (as ../shared/peers/hf_trainer_baseline.py hands it to
         the Trainer, the Trainer's "auto" values filled: its lr 3e-4, AdamW betas (0.9, 0.999), eps 1e-8,
         weight decay 0): AutoModelForCausalLM.from_config with SDPA, the model's own loss (labels=...); the
         Trainer's own per-step work (data loader, callbacks) is not in it, so this is the step alone
         on gloo, as the Trainer's DeepSpeed communicates (ours: shared memory between the ranks of a CPU node,
         pipeline.distributed.SharedMemoryCollectives)
  torch  one process only: ../shared/peers/torch_baseline.py's step (fp32 weights, autocast to the JSON's
         precision, AdamW, clip_grad_norm_ 1.0)

Rank 0 prints `RESULT {json}`: median ms per step per arm, tokens/s (all ranks), ours' speed-up over each, and each
arm's loss on the first batch (one model from the same weights: equal up to precision and kernel differences).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.normpath(os.path.join(REPO, "..", "shared", "peers"))
sys.path.insert(0, REPO)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", required=True,
                   help="a decoder preset (tiny, llama-20m, ...) or an HF config.json of a causal LM, e.g. the benchmark's")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary of a preset (default: 2000, the demo tokenizer's); a config JSON with a "
                        "vocab_size keeps its own")
    p.add_argument("--deepspeed-config", required=True, help="the DeepSpeed JSON both DeepSpeed arms train with")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--steps", type=int, default=40, help="timed steps of each arm (default 40)")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps of each arm first (default 4)")
    p.add_argument("--arms", default="ours,hf,torch",
                   help="comma-separated arms to run, of ours, hf and torch (default: all; torch in one process only). "
                        "hf builds DeepSpeed's FusedAdam op, JIT-compiled on first use (minutes on 2 cores, then cached)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    if "ours" not in args.arms or set(args.arms) - {"ours", "hf", "torch"}:
        p.error(f"--arms: ours and any of hf, torch (got {','.join(args.arms)})")
    return args


def hf_trainer_config(path: str, world: int) -> dict:
    """The JSON the HF Trainer trains with: the peer's own selection, with the values it leaves to the Trainer."""
    spec = importlib.util.spec_from_file_location("hf_trainer_baseline", os.path.join(PEERS, "hf_trainer_baseline.py"))
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    cfg = peer.trainer_ds_config(path)
    cfg["optimizer"]["params"] = {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    cfg.setdefault("train_micro_batch_size_per_gpu", 4)
    cfg.setdefault("gradient_accumulation_steps", 1)
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world
    cfg["steps_per_print"] = 10**9
    return cfg


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import load_ds_config, pipeline_stages_of, precision_of, resolve_ds_config
    from pipeline.distributed import SharedMemoryCollectives, setup, teardown
    from pipeline.models import build_model, load_model_config
    from pipeline.models.cross_entropy import lm_loss
    from pipeline.models.presets import PRESETS
    from pipeline.pretrain import param_groups

    dist = setup()
    shm = SharedMemoryCollectives.installed
    cfg = load_ds_config(args.deepspeed_config)
    cfg.pop("tensorboard", None)
    if pipeline_stages_of(cfg) > 1:
        raise SystemExit(f"step_ab: {args.deepspeed_config} has a pipeline block; the arms compare unpipelined "
                         "steps (the HF Trainer has no pipeline engine): give a ZeRO 0-3 JSON")
    ours_cfg, _ = resolve_ds_config(cfg, world_size=dist.world_size, train_steps=args.warmup + args.steps,
                                    output_dir=tempfile.gettempdir(), accelerator=dist.accelerator)
    micro = ours_cfg["train_micro_batch_size_per_gpu"]
    if ours_cfg["gradient_accumulation_steps"] != 1:
        raise SystemExit("step_ab: the JSON must have gradient_accumulation_steps 1 (one micro-batch per step)")
    precision = precision_of(ours_cfg)
    vocab = args.vocab_size or (2000 if args.model_config in PRESETS else 0)
    config, _ = load_model_config(args.model_config, vocab, {})
    config.use_cache = False

    torch.manual_seed(0)
    ours_model = build_model(args.model_config, "clm", config.vocab_size, {})
    initial = {k: v.detach().clone() for k, v in ours_model.state_dict().items()}  # before DeepSpeed casts or
    # partitions it (ZeRO-3 leaves empty parameters behind): every arm starts from these fp32 weights
    ours, *_ = deepspeed.initialize(model=ours_model, model_parameters=param_groups(ours_model), config=ours_cfg)
    device = ours.device

    def ours_step(x):
        loss = lm_loss(ours(input_ids=x).logits, x, True)
        ours.backward(loss)
        ours.step()
        return loss

    arms = {"ours": ours_step}
    if "hf" in args.arms:
        hf_model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa",
                                                    trust_remote_code=False)
        hf_model.load_state_dict(initial)
        hf, *_ = deepspeed.initialize(model=hf_model, model_parameters=hf_model.parameters(),
                                      config=hf_trainer_config(args.deepspeed_config, dist.world_size))

        def hf_step(x):
            if shm is not None:
                shm.active = False  # the Trainer's DeepSpeed talks gloo
            try:
                loss = hf(input_ids=x, labels=x).loss
                hf.backward(loss)
                hf.step()
            finally:
                if shm is not None:
                    shm.active = True
            return loss

        arms["hf"] = hf_step
    if "torch" in args.arms and dist.world_size == 1:  # the plain loop has no data parallelism: one process only
        torch_model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa",
                                                       trust_remote_code=False).to(device)
        torch_model.load_state_dict(initial)
        torch_model.train()
        opt = torch.optim.AdamW(torch_model.parameters(), lr=3e-4)
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

        def torch_step(x):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = torch_model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        arms["torch"] = torch_step

    g = torch.Generator().manual_seed(1 + dist.rank)
    times: dict[str, list[float]] = {name: [] for name in arms}
    first_loss = {}  # each arm's loss on the first batch, from the same weights: they train one model
    for i in range(args.warmup + args.steps):
        x = torch.randint(0, config.vocab_size, (micro, args.seq_length), generator=g).to(device)
        for name in (list(arms) if i % 2 == 0 else list(arms)[::-1]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = arms[name](x)
            if i == 0:
                first_loss[name] = round(float(loss), 5)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    tokens = micro * args.seq_length * dist.world_size
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {"world_size": dist.world_size, "precision": precision, "micro_batch": micro, "seq_length": args.seq_length,
              "steps": args.steps, "threads": torch.get_num_threads(), "first_loss": first_loss,
              "shm_collectives": shm is not None,
              "ms_per_step": {name: round(m * 1000, 2) for name, m in median.items()},
              "tokens_per_sec": {name: round(tokens / m, 1) for name, m in median.items()},
              **{f"ours_vs_{name}": median[name] / median["ours"] for name in arms if name != "ours"}}
    if dist.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    teardown()
    return result


if __name__ == "__main__":
    main()
