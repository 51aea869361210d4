"""LoRA and AdaLoRA adapters (through peft) under any ZeRO stage, and their export.

    model = lora.apply(model, lora.make_config("lora", "SEQ_CLS", r=8, alpha=16, dropout=0.05))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), ...)
    ...
    lora.export(engine, tokenizer, "RUN/hf", adapter_dir="RUN/adapter")   # every rank calls it

Only the adapter matrices train (plus, for classification, the fresh head: peft's `modules_to_save`
for SEQ_CLS is the `score`/`classifier` layer, and an encoder's `pooler` is added, since a masked-LM
checkpoint has none and it would otherwise stay at its random init). The frozen base weights still go
through ZeRO-3's partitioning like any others; the optimizer only holds the trainable ones.

Export: the full state dict (ZeRO-3 gathers it, a collective) is loaded on rank 0 into a CPU copy of
the peft model, the adapters are merged into the base weights (`merge_and_unload`), and the result is
written with `save_pretrained` in the training dtype: `RUN/hf/` is a plain transformers model. The
adapter alone (`adapter_model.safetensors` + `adapter_config.json`, loadable with
`PeftModel.from_pretrained(base, RUN/adapter)`) is written on request.

AdaLoRA: peft's `update_and_allocate` reads `p.grad` and masks `p` in place, which ZeRO does not
allow (gradients and fp32 master weights live in the optimizer's partitions; ZeRO-3 parameters are
empty outside a forward). `AdaLoraUpdater` runs peft's own rank allocator on full copies read through
DeepSpeed's `safe_get_full_fp32_param`/`safe_get_full_grad` (collectives, same order on every rank) and
writes the masked singular values back with `safe_set_full_fp32_param`. It runs after backward and
before the optimizer step (the loop's `before_step` hook), where the reduced gradients are readable;
peft's own loop masks after the step instead, so a masked value here carries one step of update. The
orthogonality regulariser that peft adds to the model's own loss does not apply: the stage computes
the loss itself. The rank pattern (which singular values are kept) is part of each checkpoint's task state
(`state()`/`load_state()`), so the export of an earlier best checkpoint masks with that checkpoint's pattern,
not the final one.
"""
from __future__ import annotations

import copy
import shutil

import torch

from pipeline.distributed import barrier

KINDS = ("lora", "adalora")


def make_config(kind: str, task_type: str, r: int, alpha: float, dropout: float, targets: list[str] | None,
                total_steps: int, modules_to_save: list[str] | None = None):
    """A peft config: LoRA with rank r, or AdaLoRA from rank 1.5 r down to an average of r over the run."""
    from peft import AdaLoraConfig, LoraConfig

    common = dict(task_type=task_type, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                  modules_to_save=modules_to_save)
    if kind == "lora":
        return LoraConfig(r=r, **common)
    if kind == "adalora":
        # Budget schedule: full rank for the first 10% of steps, pruned (cubic) until 80%, fixed for the last 20%.
        return AdaLoraConfig(init_r=max(r + 1, round(1.5 * r)), target_r=r, total_step=total_steps,
                             tinit=total_steps // 10, tfinal=total_steps // 5, deltaT=max(1, total_steps // 50),
                             **common)
    raise ValueError(f"adapter kind {kind!r}; expected one of {', '.join(KINDS)}")


def extra_trainable_modules(model) -> list[str]:
    """Modules besides the head that must train with the adapters: an encoder's pooler (see the module doc)."""
    return ["pooler"] if any(name.endswith("pooler") for name, _ in model.named_modules()) else []


def apply(model, config):
    """Wrap a transformers model in a peft model: the base frozen, adapters (and head) trainable."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the model
        raise ValueError(f"LoRA: {e} (choose the layers with --lora-targets)") from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (ZeRO-3 aware: ds_numel is a partitioned parameter's full size)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def full_state_dict(engine) -> dict | None:
    """The module's full state dict on rank 0 (CPU tensors), None elsewhere. Every rank must call it."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # collective
    if engine.global_rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def merged_model(peft_model, state_dict: dict):
    """A CPU transformers model: a fresh copy of peft_model's architecture with `state_dict` loaded and the
    adapters merged in, in the state dict's dtype."""
    from peft import get_peft_model

    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    skeleton = type(base)._from_config(config, attn_implementation=config._attn_implementation, dtype=torch.float32)
    config = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    pattern = getattr(config, "rank_pattern", None) if config.peft_type == "ADALORA" else None
    if pattern:
        config.rank_pattern = None  # AdaLoRA keeps full-rank tensors and masks them (its rank_pattern is masks)
    clone = get_peft_model(skeleton, config)
    result = clone.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
    params = {name for name, _ in clone.named_parameters()}
    missing = [k for k in result.missing_keys if k in params]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"LoRA export: state dict does not match the model (missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]})")
    if pattern:  # the final AdaLoRA budget: pruned singular values are exactly zero in the merged weights
        clone.base_model.rankallocator.mask_using_rank_pattern(clone.base_model.model, pattern)
    dtype = next(iter(state_dict.values())).dtype
    return clone.merge_and_unload().to(dtype)


def export(engine, tokenizer, out_dir: str, adapter_dir: str | None = None) -> None:
    """Write the merged model to out_dir (and the adapter to adapter_dir) from rank 0; every rank calls it."""
    from pipeline.export import save_hf
    from pipeline.files import publish_folder

    state_dict = full_state_dict(engine)
    if engine.global_rank == 0:
        peft_model = engine.module
        if adapter_dir:
            tmp = adapter_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            peft_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_hf(tmp)
            publish_folder(tmp, adapter_dir)
        save_hf(merged_model(peft_model, state_dict), tokenizer, out_dir)
    barrier()


class AdaLoraUpdater:
    """AdaLoRA's importance scores and rank budget under DeepSpeed; call as `before_step(engine, step)`."""

    def __init__(self, peft_model):
        self.adalora = peft_model.base_model  # peft's AdaLoraModel
        self.name = peft_model.active_adapter
        self.config = self.adalora.peft_config[self.name]
        # Names as peft's allocator sees them: relative to the transformers model inside AdaLoraModel.
        self.params = [(n, p) for n, p in self.adalora.model.named_parameters() if "lora_" in n and self.name in n]

    def state(self) -> dict:
        """The rank pattern as it stands (None before the first allocation): {module name: [kept, ...]}."""
        return {"rank_pattern": self.config.rank_pattern}

    def load_state(self, state: dict) -> None:
        """Bring back a checkpoint's rank pattern: the export masks with it (see merged_model)."""
        self.config.rank_pattern = state.get("rank_pattern")

    def __call__(self, engine, step: int) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_set_full_fp32_param

        copies = {}
        for n, p in self.params:  # the same order on every rank: these are collectives under ZeRO
            weight = safe_get_full_fp32_param(p)
            grad = safe_get_full_grad(p)
            t = (weight if weight is not None else p.detach()).detach().float().clone()
            t.grad = grad.detach().float().clone().reshape(t.shape) if grad is not None else torch.zeros_like(t)
            copies[n] = t
        proxy = _Params(copies)
        allocator, total, final = self.adalora.rankallocator, self.config.total_step, self.config.tfinal
        if step < total - final:
            _, pattern = allocator.update_and_allocate(proxy, step)
            if pattern:
                self.config.rank_pattern = pattern
        elif step == total - final:
            _, pattern = allocator.update_and_allocate(proxy, step, force_mask=True)
            self.config.rank_pattern = pattern
            allocator.reset_ipt()
        elif self.config.rank_pattern:
            allocator.mask_using_rank_pattern(proxy, self.config.rank_pattern)
        for n, p in self.params:
            if "lora_E" not in n:
                continue
            value = copies[n]
            safe_set_full_fp32_param(p, value)  # the optimizer's fp32 copy (ZeRO 1-3, bf16 optimizer)
            if not hasattr(p, "ds_id"):  # and the module's own weight where it holds the full tensor
                p.data.copy_(value.to(p.dtype))


class _Params:
    """A stand-in for a module whose named_parameters() are the full copies (what peft's allocator walks)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def named_parameters(self):
        return iter(self.tensors.items())
