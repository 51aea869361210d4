"""Per-GPU memory of a training run under ZeRO 0-3, CPU offload and pipeline stages, and the config to pick.

    python tools/estimate_memory.py --model llama-1b --seq-length 2048 --micro-batch 4 --gpus-per-node 8 --nodes 1
    python tools/estimate_memory.py --model my_config.json --gpu-memory 24 --pipeline-stages 2
    python tools/estimate_memory.py --model runs/tiny/hf --seq-length 128

The vocabulary is the one the config JSON or HF folder names; a preset (or a config without vocab_size)
takes its vocabulary from the tokenizer at training time, so here it is 32000. --vocab-size replaces either.

Model states use DeepSpeed's own estimators for ZeRO-2 and ZeRO-3 (with and without offload) and the
same arithmetic for ZeRO-0/1: mixed-precision Adam keeps 2 bytes of 16-bit weights and 2 of gradients
per parameter on the GPU, plus 12 bytes of fp32 master weights, momentum and variance that ZeRO-1/2/3
divide across the data-parallel ranks (16 bytes/param without ZeRO).

Activations (16-bit, SDPA/flash attention, no recomputation) are about 34 x seq x micro x hidden bytes
per layer (Korthikanti et al. 2022, without the attention-matrix term that flash attention avoids),
plus the logits (6 x seq x micro x vocab bytes: 16-bit logits and their fp32 copy for the loss). With
activation checkpointing a layer keeps only its input (2 x seq x micro x hidden bytes) and one layer
is recomputed at a time. These are estimates: allocator fragmentation and communication buffers add
10-20%, which is why a config is picked only when it fits in 85% of --gpu-memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GB = 2**30
DEFAULT_VOCAB = 32000  # a preset's vocabulary when --vocab-size is not given (Llama's tokenizer)


def own_vocab(model: str) -> int:
    """The vocabulary a config JSON or HF folder names; DEFAULT_VOCAB for a preset or a config without one.
    A --model that is none of these (or bad JSON) is left to load_model_config to report."""
    from pipeline.models.presets import PRESETS

    path = model if os.path.isfile(model) else os.path.join(model, "config.json")
    if model in PRESETS or not os.path.isfile(path):
        return DEFAULT_VOCAB
    try:
        with open(path, encoding="utf-8") as f:
            given = json.load(f).get("vocab_size")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return DEFAULT_VOCAB
    return given if isinstance(given, int) and given > 0 else DEFAULT_VOCAB


def count_params(model: str, vocab_size: int | None = None) -> tuple[int, int, object]:
    """(total parameters, parameters of the largest layer, config), built on the meta device (no memory).
    vocab_size replaces the model's own vocabulary (own_vocab) when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from pipeline.models import load_model_config

    config, _ = load_model_config(model, own_vocab(model), {})
    if vocab_size:
        config.vocab_size = vocab_size
    cls = AutoModelForMaskedLM if config.model_type in ("bert", "roberta", "distilbert", "electra") else AutoModelForCausalLM
    with torch.device("meta"):
        m = cls.from_config(config, trust_remote_code=False)
    total = sum(p.numel() for p in m.parameters())
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in m.modules())
    return total, largest, config


def model_states(total: int, largest: int, gpus_per_node: int, nodes: int) -> dict[str, tuple[float, float]]:
    """config -> (GPU bytes, CPU bytes) per GPU / per node for the model states."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = gpus_per_node * nodes
    out = {"zero0": (16 * total, 0), "zero1": (4 * total + 12 * total / n, 0)}
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=offload)
        out["zero2_offload" if offload else "zero2"] = (gpu, cpu)
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes, cpu_offload=offload,
                                                           cpu_offload_params=offload)
        out["zero3_offload" if offload else "zero3"] = (gpu, cpu)
    return out


def activations(config, seq: int, micro: int, checkpointing: bool, layers: int | None = None) -> float:
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = layers if layers is not None else (getattr(config, "num_hidden_layers", None) or config.n_layer)
    per_layer_full = 34 * seq * micro * hidden
    logits = 6 * seq * micro * config.vocab_size
    if checkpointing:
        return layers * 2 * seq * micro * hidden + per_layer_full + logits
    return layers * per_layer_full + logits


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a preset name, a model config JSON, or an HF folder")
    p.add_argument("--vocab-size", type=int, help="vocabulary (default: what the config JSON or HF folder says; "
                   f"{DEFAULT_VOCAB} for a preset, whose vocabulary comes from the tokenizer); given, it replaces "
                   "the model's own")
    p.add_argument("--seq-length", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-step")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs on each node")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--pipeline-stages", type=int, default=2, help="stages for the pipeline row (ZeRO-1 inside)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU, to pick a config that fits")
    args = p.parse_args(argv)
    for name in ("vocab_size", "seq_length", "micro_batch", "gpus_per_node", "nodes", "pipeline_stages", "gpu_memory"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

    total, largest, config = count_params(args.model, args.vocab_size)
    gpus = args.gpus_per_node * args.nodes
    rows = []
    for ckpt in (False, True):
        act = activations(config, args.seq_length, args.micro_batch, ckpt)
        for name, (gpu, cpu) in model_states(total, largest, args.gpus_per_node, args.nodes).items():
            rows.append({"config": name + (" + act. ckpt" if ckpt else ""), "states": gpu, "activations": act,
                         "gpu": gpu + act, "cpu_per_node": cpu,
                         "json": f"ds_configs/{name}.json" + (' plus "activation_checkpointing": {}' if ckpt else "")})
        # Pipeline: each stage holds 1/S of the layers; the first stage keeps up to S micro-batches in flight (1F1B).
        stages = args.pipeline_stages
        if gpus % stages == 0 and stages > 1:
            dp = gpus // stages
            layers = getattr(config, "num_hidden_layers", None) or config.n_layer
            per_stage = total / stages
            states = 4 * per_stage + 12 * per_stage / dp
            act = stages * activations(config, args.seq_length, args.micro_batch, ckpt, layers=-(-layers // stages))
            rows.append({"config": f"pipe{stages} (ZeRO-1, dp {dp})" + (" + act. ckpt" if ckpt else ""),
                         "states": states, "activations": act, "gpu": states + act, "cpu_per_node": 0,
                         "json": f'ds_configs/pipe2.json with "pipeline": {{"stages": {stages}'
                                 + (', "activation_checkpoint_interval": 1' if ckpt else "") + "}"})

    print(f"{args.model}: {total / 1e6:,.1f}M parameters (largest layer {largest / 1e6:,.1f}M), vocab {config.vocab_size}, "
          f"seq {args.seq_length}, "
          f"micro-batch {args.micro_batch}, {args.gpus_per_node} GPU(s) x {args.nodes} node(s)")
    print(f"{'config':<34}{'states GiB':>12}{'activ. GiB':>12}{'GPU GiB':>10}{'CPU GiB/node':>14}")
    for r in rows:
        print(f"{r['config']:<34}{r['states'] / GB:>12.2f}{r['activations'] / GB:>12.2f}{r['gpu'] / GB:>10.2f}"
              f"{r['cpu_per_node'] / GB:>14.2f}")
    # Prefer the least communication: plain rows in this order, checkpointing only when needed.
    budget = 0.85 * args.gpu_memory * GB
    fits = [r for r in rows if r["gpu"] <= budget]
    if fits:
        print(f"\npick: {fits[0]['config']} (fits in 85% of {args.gpu_memory:g} GiB): {fits[0]['json']}")
    else:
        print(f"\nnothing fits in {args.gpu_memory:g} GiB per GPU: add GPUs or nodes, or lower the micro-batch/sequence")
    return rows


if __name__ == "__main__":
    from pipeline.cli import run_main

    run_main(main, "estimate_memory")
