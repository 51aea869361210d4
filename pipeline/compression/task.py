"""The Task (pipeline.training) of a compression run: another stage's task with compression in it.

The base task (pretraining windows or a classifier's examples) supplies data and evaluation; this one
steps the compression schedule before every forward pass, at the step the engine has reached, and,
with knowledge distillation, adds the frozen teacher's view to the loss (pipeline/compression/distill.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.compression.compressor import Compressor
from pipeline.compression.distill import distillation_loss, hidden_pairs
from pipeline.compression.schema import CompressionConfig


class CompressionTask:
    def __init__(self, base, compressor: Compressor, config: CompressionConfig, teacher: torch.nn.Module | None = None,
                 teacher_layers: int | None = None, log: Callable[[str], None] = print):
        self.base, self.compressor, self.log = base, compressor, log
        self.tokens_per_step = base.tokens_per_step
        self.kd = config.knowledge_distillation
        self.teacher = teacher
        if self.kd is not None:
            if teacher is None:
                raise ValueError("knowledge distillation needs the teacher model")
            kept = list(config.layer_reduction.teacher_layer) if config.layer_reduction else list(range(teacher_layers))
            self.pairs = hidden_pairs(kept, teacher_layers)

    def next_batch(self) -> dict:
        return self.base.next_batch()

    def loss(self, engine, batch: dict) -> torch.Tensor:
        step = engine.global_steps
        for event in self.compressor.update(step):
            self.log(f"step {step:>6} | {event}")
        if self.kd is None:
            return self.base.loss(engine, batch)
        hidden = self.kd.hidden_weight > 0
        out = engine(**batch, output_hidden_states=hidden)
        with torch.no_grad():
            teacher_out = self.teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=hidden)
        loss, _ = distillation_loss(self.kd, out.loss, out, teacher_out, self.pairs)
        return loss

    def evaluate(self, engine, split: str) -> dict[str, float]:
        return self.base.evaluate(engine, split)

    def state(self) -> dict:
        return self.base.state()

    def load_state(self, state: dict) -> None:
        self.base.load_state(state)
