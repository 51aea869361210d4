"""The compression state of a model in training: wrappers installed by the plan, schedules by step.

    compressor = Compressor(model, config, plan)   # wraps the planned modules in place
    compressor.update(step)                        # before each forward: step = optimizer steps done
    compressor.finalize()                          # every method at its target (before cleaning)

Schedules (step = optimizer steps done, DeepSpeed's `engine.global_steps`):
- weight / activation quantization are on from `schedule_offset`;
- sparse pruning: masks are recomputed every `schedule_offset_stride` steps from `schedule_offset`
  to `schedule_offset_end`, with the kept share following the cubic schedule of Zhu & Gupta (2017),
  d(t) = r + (1 - r)(1 - p)^3, p = (t - offset) / (end - offset), down to the target r. Each module
  keeps its largest-magnitude weights among those still kept, so a pruned weight stays pruned;
- head and row pruning happen once, at `schedule_offset`: units are ranked by magnitude (a head
  group: norm of its value rows x norm of its output-projection columns; an MLP channel: norms of
  its rows in the input projections x norm of its column in the output projection) and the lowest
  are masked. Training after that step lets the rest recover.
All of it is a function of the step and the mask buffers, which are in every checkpoint: a resumed
run continues exactly, with no state of its own.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.compression.modules import CompressedEmbedding, CompressedLinear, wrap
from pipeline.compression.plan import Plan
from pipeline.compression.schema import CompressionConfig


def kept_share(step: int, target: float, offset: int, end: int) -> float:
    """The cubic sparsity schedule: 1 before `offset`, `target` from `end` on."""
    if step < offset:
        return 1.0
    progress = 1.0 if end <= offset else min(1.0, (step - offset) / (end - offset))
    return target + (1.0 - target) * (1.0 - progress) ** 3


class Compressor:
    def __init__(self, model: nn.Module, config: CompressionConfig, plan: Plan):
        self.model, self.config, self.plan = model, config, plan
        self.last_step: int | None = None
        for name, p in plan.modules.items():
            if not (p.scheme or p.act_bits or p.dense_ratio is not None):
                continue  # post-training quantization only: nothing happens in training
            w = wrap(model, name)
            w.scheme = p.scheme
            if isinstance(w, CompressedLinear):
                w.act_bits, w.act_symmetric = p.act_bits, p.act_symmetric
                if p.dense_ratio is not None:
                    w.add_mask("sparse")
        for block, _ in plan.heads:
            for name in (block.q, block.k, block.v):
                wrap(model, name).add_mask("row")
            wrap(model, block.o).add_mask("col")
        for block, _ in plan.rows:
            for name in block.rows:
                wrap(model, name).add_mask("row")
            wrap(model, block.out).add_mask("col")

    def _module(self, name: str) -> CompressedLinear | CompressedEmbedding:
        return self.model.get_submodule(name)

    @torch.no_grad()
    def update(self, step: int) -> list[str]:
        """Bring every method to where its schedule is at `step`; returns what changed, for the log."""
        if step == self.last_step:
            return []
        self.last_step = step
        events = []
        c = self.config
        for method, attr in ((c.weight_quantization, "quant_on"), (c.activation_quantization, "act_on")):
            if method is None:
                continue
            on = step >= method.schedule_offset
            for name, p in self.plan.modules.items():
                if (p.scheme if attr == "quant_on" else p.act_bits):
                    module = self._module(name)
                    if getattr(module, attr) != on and on:
                        events.append(f"{method.name} on")
                    setattr(module, attr, on)
        if c.sparse_pruning is not None:
            events += self._sparse(step)
        if c.head_pruning is not None and step >= c.head_pruning.schedule_offset:
            events += self._heads()
        if c.row_pruning is not None and step >= c.row_pruning.schedule_offset:
            events += self._rows()
        return sorted(set(events))

    def finalize(self) -> list[str]:
        """Every method at its target, whatever the step the training stopped at."""
        return self.update(2**62)

    # ---------------------------------------------------------------- unstructured

    def _sparse(self, step: int) -> list[str]:
        m = self.config.sparse_pruning
        if step < m.schedule_offset:
            return []
        on_stride = (step - m.schedule_offset) % m.schedule_offset_stride == 0
        events = []
        for name, p in self.plan.modules.items():
            if p.dense_ratio is None:
                continue
            share = kept_share(step, p.dense_ratio, m.schedule_offset, m.schedule_offset_end)
            module = self._module(name)
            current = float(module.sparse_mask.float().mean())
            if not (on_stride or step >= m.schedule_offset_end) or share >= current - 1e-9:
                continue
            magnitude = module.masked_weight().abs().float().reshape(-1)
            keep = max(1, round(share * magnitude.numel()))
            mask = torch.zeros_like(magnitude)
            mask[magnitude.topk(keep, sorted=False).indices] = 1
            module.sparse_mask.copy_(mask.reshape(module.sparse_mask.shape))
            events.append(f"sparse_pruning: {share:.0%} of weights kept")
        return events

    # ---------------------------------------------------------------- structured

    def _heads(self) -> list[str]:
        events = []
        for block, kept in self.plan.heads:
            q, k, v, o = (self._module(n) for n in (block.q, block.k, block.v, block.o))
            if kept >= block.units or not bool(k.row_mask.all()):
                continue  # nothing to remove, or done already (masks come back from a checkpoint)
            vw, ow = v.masked_weight().float(), o.masked_weight().float()
            scores = torch.stack([vw[block.kv_rows([u])].norm() * ow[:, block.q_rows([u])].norm()
                                  for u in range(block.units)])
            drop = sorted(set(range(block.units)) - set(scores.topk(kept).indices.tolist()))
            q.row_mask[block.q_rows(drop)] = 0
            k.row_mask[block.kv_rows(drop)] = 0
            v.row_mask[block.kv_rows(drop)] = 0
            o.col_mask[block.q_rows(drop)] = 0
            events.append("head_pruning: heads masked")
        return events

    def _rows(self) -> list[str]:
        events = []
        for block, kept in self.plan.rows:
            rows = [self._module(n) for n in block.rows]
            out = self._module(block.out)
            if kept >= block.width or not bool(out.col_mask.all()):
                continue
            score = out.masked_weight().float().norm(dim=0)            # (width,): column norms of the output projection
            for r in rows:
                score = score * r.masked_weight().float().norm(dim=1)  # row norms of each input projection
            drop = torch.ones(block.width, dtype=torch.bool)
            drop[score.topk(kept).indices] = False
            for r in rows:
                r.row_mask[drop] = 0
            out.col_mask[drop] = 0
            events.append("row_pruning: MLP channels masked")
        return events

    # ---------------------------------------------------------------- what cleaning needs

    def kept_units(self) -> dict[int, list[int]]:
        """layer -> the attention units (key/value head groups) still kept."""
        result = {}
        for block, _ in self.plan.heads:
            mask = self._module(block.k).row_mask
            result[block.layer] = [u for u in range(block.units) if bool(mask[block.kv_rows([u])].all())]
        return result

    def kept_rows(self) -> dict[int, list[int]]:
        """layer -> the MLP channels still kept."""
        return {block.layer: self._module(block.out).col_mask.nonzero().squeeze(1).tolist() for block, _ in self.plan.rows}
