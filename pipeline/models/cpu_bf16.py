"""bf16 matrix products on a CPU without native bf16 (no AVX512-BF16, no AMX): done by fp32 kernels.

On such a CPU PyTorch's bf16 GEMM and bf16 SDPA fall back to slow generic code. Measured on the
2-core AVX2 test machine, one thread, on the `tiny` preset's shapes: a bf16 matmul runs at ~2 GFLOP/s
against ~55 for fp32 (a (1024, 128) x (128, 344) linear: 37 ms in bf16, 2 ms through fp32), and SDPA
forward + backward at (4, 4, 256, 32) takes 91 ms in bf16 against 23 ms in fp32.

The product of two bf16 numbers is exact in fp32, and a native bf16 GEMM accumulates in fp32 and
rounds the result to bf16 once. Upcasting the bf16 operands, multiplying with the fp32 kernel and
rounding the result to bf16 computes the same numbers (up to summation order) at fp32 speed. Weights,
activations and gradients stay bf16, as the DeepSpeed JSON says; only the arithmetic moves.

`use_fp32_kernels_for_bf16(model)` does this for one model, and only where it pays: tensors that are
bf16 and on the CPU, on a CPU without native bf16 (elsewhere it installs nothing). Its `nn.Linear`
layers call `_LinearInFp32` from their own forward (ZeRO-3 replaces `torch.nn.functional.linear` by its
memory-efficient linear, whose backward would run torch's bf16 GEMM; `_LinearInFp32` saves the same
tensors, the bf16 input and the parameter itself, so ZeRO-3 still frees the gathered weight after
forward). Everything else goes through a TorchFunctionMode that is active while any of the model's
modules runs forward, so it covers the whole model, a pipeline stage's layers and the forward
recomputed by activation checkpointing, for every architecture (GPT-2's `torch.addmm`, SDPA, eager
attention's `matmul`, a functional `F.linear`).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Functions whose bf16 tensor arguments are upcast, computed in fp32, and whose result is rounded to
# bf16. autograd records the casts, so their backward (matrix products too) runs in fp32 as well.
UPCAST = {F.scaled_dot_product_attention, torch.addmm, torch.matmul, torch.bmm, torch.Tensor.matmul,
          torch.Tensor.__matmul__}


class _LinearInFp32(torch.autograd.Function):
    """y = x W^T + b for bf16 x, W (and b) with fp32 products. It saves the bf16 x and W (not fp32
    copies, which would double the activation memory) and upcasts them again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.float().reshape(-1, grad.shape[-1])  # (N, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g @ weight.float()).reshape(x.shape).to(x.dtype)  # (N, out) x (out, in)
        if ctx.needs_input_grad[1]:
            gw = (g.t() @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)  # (out, N) x (N, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0).to(weight.dtype)
        return gx, gw, gb


def _is_cpu_bf16(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.device.type == "cpu"


def _upcast(value):
    if _is_cpu_bf16(value):
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_upcast(v) for v in value)
    return value


def _round(value):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(torch.bfloat16)
    if isinstance(value, tuple):
        return tuple(_round(v) for v in value)
    return value


class Fp32KernelsForBf16(TorchFunctionMode):
    """While active: bf16 CPU matrix products (see UPCAST and F.linear) run in fp32, results in bf16."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and _is_cpu_bf16(args[0]):
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if weight.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16):
                return _LinearInFp32.apply(x, weight, bias)
        elif func in UPCAST and any(_is_cpu_bf16(a) for a in (*args, *kwargs.values())):
            return _round(func(*_upcast(args), **{k: _upcast(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward, with bf16 CPU inputs on fp32 kernels whatever `F.linear` currently is."""
    if _is_cpu_bf16(x) and self.weight.dtype == torch.bfloat16:
        return _LinearInFp32.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def cpu_lacks_native_bf16() -> bool:
    """True on a CPU whose oneDNN has no native bf16 kernels (AVX512-BF16 or AMX)."""
    from pipeline.config import cpu_has_native_bf16

    return not cpu_has_native_bf16()


def use_fp32_kernels_for_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model`'s bf16 CPU matrix products use fp32 kernels (see the module docstring); a no-op,
    returning the model untouched, on a CPU with native bf16 or when the model never runs on a CPU."""
    if not cpu_lacks_native_bf16() or torch.cuda.is_available():
        return model
    mode = Fp32KernelsForBf16()
    depth = [0, False]  # modules nest: the outermost forward enters the mode (when bf16), its return leaves it

    def enter(module, args):
        # The outermost module is the model, or a pipeline stage's layer: its parameters are bf16 once
        # DeepSpeed has cast them (in place, when the JSON says bf16).
        if depth[0] == 0 and getattr(next(module.parameters(), None), "dtype", None) == torch.bfloat16:
            mode.__enter__()
            depth[1] = True
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1
        if depth[0] == 0 and depth[1]:
            mode.__exit__(None, None, None)
            depth[1] = False

    for module in model.modules():
        if type(module).forward is torch.nn.Linear.forward:
            module.forward = types.MethodType(_linear_forward, module)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)  # also when forward raises
    return model
