"""Knowledge distillation from the uncompressed teacher: a loss on the logits and, optionally, on the
hidden states of corresponding layers.

    loss = task_weight x task loss
         + logits_weight x KL(softmax(teacher / T) || softmax(student / T)) x T^2   (Hinton et al., 2015)
         + hidden_weight x mean over layer pairs of MSE(student hidden, teacher hidden)

Logits are (B, C) for a classifier or (B, T, V) for a language model (every position counts); the KL
is averaged over rows. Layer pairs, as indices into HF `hidden_states` (0 = embeddings, i = after
layer i-1, and the last entry is the final output, after the final norm where the model has one):
student i <-> teacher teacher_layer[i-1] + 1 for i = 1 .. k-1, and the final outputs with each other.
Without layer reduction teacher_layer is the identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.compression.schema import Distillation


def hidden_pairs(teacher_layer: list[int], teacher_layers: int) -> list[tuple[int, int]]:
    k = len(teacher_layer)
    return [(i, teacher_layer[i - 1] + 1) for i in range(1, k)] + [(k, teacher_layers)]


def logits_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    s = student.float().reshape(-1, student.shape[-1]) / temperature
    t = teacher.float().reshape(-1, teacher.shape[-1]) / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") * temperature ** 2


def distillation_loss(kd: Distillation, task_loss: torch.Tensor | None, student_out, teacher_out,
                      pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total loss, its detached parts)."""
    parts: dict[str, torch.Tensor] = {}
    if kd.task_weight:
        if task_loss is None:
            raise ValueError("knowledge_distillation.task_weight > 0 needs the task loss: the batch has no labels")
        parts["task"] = task_loss.float()
    if kd.logits_weight:
        parts["logits"] = logits_kl(student_out.logits, teacher_out.logits, kd.temperature)
    if kd.hidden_weight:
        s, t = student_out.hidden_states, teacher_out.hidden_states
        parts["hidden"] = torch.stack([F.mse_loss(s[i].float(), t[j].float()) for i, j in pairs]).mean()
    weights = {"task": kd.task_weight, "logits": kd.logits_weight, "hidden": kd.hidden_weight}
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: v.detach() for k, v in parts.items()}
