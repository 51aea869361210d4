"""What a run reports: TensorBoard scalars (through DeepSpeed's own monitor, so the JSON's
`tensorboard`/`wandb`/`csv_monitor` blocks decide where they go), console lines, FLOPs and MFU,
memory, and the run's `summary.json`.
"""
from __future__ import annotations

import resource

import torch

from pipeline.files import write_json  # noqa: F401  (stages import it from here too)

# Dense bf16/fp16 tensor-core peaks, FLOP/s, by substring of torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "L4": 121e12, "V100": 125e12, "4090": 165e12, "3090": 71e12}


def peak_flops(accelerator: str) -> float | None:
    """The device's dense half-precision peak when known (None on CPU: no honest single number)."""
    if accelerator != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def training_flops_per_token(config, seq_length: int) -> float:
    """Forward + backward FLOPs per token: 6 x (matmul weights) + attention scores and values.

    Matmul weights are every 2-D weight of the blocks plus the output head (vocab x hidden, a
    matmul even when tied to the embedding; an encoder's masked-LM head adds its hidden x hidden
    transform); embedding lookups are not matmuls. Attention per layer per token: QK^T and AV are
    each 2 x T x hidden FLOPs forward, x3 for fwd+bwd = 12 x T x hidden (the full T x T square, the
    usual convention, though a causal kernel skips about half of it).
    """
    from pipeline.models.presets import ENCODERS

    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    gated = getattr(config, "model_type", "") in {"llama", "mistral", "qwen2", "gemma"}
    mlp = hidden * inter * (3 if gated else 2)
    head = config.vocab_size * hidden + (hidden * hidden if getattr(config, "model_type", "") in ENCODERS else 0)
    matmul_params = layers * (attn + mlp) + head
    return 6.0 * matmul_params + 12.0 * layers * seq_length * hidden


def memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: the accelerator's allocator on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Monitor:
    """Rank 0 writes; every rank may call (the others do nothing)."""

    def __init__(self, engine, is_main: bool, flops_per_token: float, peak: float | None):
        self.engine, self.is_main = engine, is_main
        self.flops_per_token, self.peak = flops_per_token, peak

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([(name, float(v), step) for name, v in values.items() if v is not None])

    def throughput(self, tokens_per_sec: float) -> dict[str, float | None]:
        achieved = tokens_per_sec * self.flops_per_token
        return {"tflops": achieved / 1e12, "mfu": achieved / self.peak if self.peak else None}

    def print(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)
