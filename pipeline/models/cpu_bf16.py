"""bf16 matrix products on fp32 kernels where torch's bf16 ones are slow: all of them on a CPU without native
bf16 (no AVX512-BF16, no AMX), short attention on one with it.

On such a CPU PyTorch's bf16 GEMM and bf16 SDPA fall back to slow generic code. Measured on the
2-core AVX2 test machine, one thread, on the `tiny` preset's shapes: a bf16 matmul runs at ~2 GFLOP/s
against ~55 for fp32 (a (1024, 128) x (128, 344) linear: 37 ms in bf16, 2 ms through fp32), and SDPA
forward + backward at (4, 4, 256, 32) takes 91 ms in bf16 against 23 ms in fp32.

The product of two bf16 numbers is exact in fp32, and a native bf16 GEMM accumulates in fp32 and
rounds the result to bf16 once. Upcasting the bf16 operands, multiplying with the fp32 kernel and
rounding the result to bf16 computes the same numbers (up to summation order) at fp32 speed. Weights,
activations and gradients stay bf16, as the DeepSpeed JSON says; only the arithmetic moves.

`use_fp32_kernels_for_bf16(model)` does this for one model, and only where it pays: tensors that are
bf16 and on the CPU, on a CPU without native bf16 (on a GPU it installs nothing). Its `nn.Linear`
layers call `_LinearInFp32` from their own forward (ZeRO-3 replaces `torch.nn.functional.linear` by its
memory-efficient linear, whose backward would run torch's bf16 GEMM; `_LinearInFp32` saves the same
tensors, the bf16 input and the parameter itself, so ZeRO-3 still frees the gathered weight after
forward). Everything else goes through a TorchFunctionMode that is active while any of the model's
modules runs forward, so it covers the whole model, a pipeline stage's layers and the forward
recomputed by activation checkpointing, for every architecture (GPT-2's `torch.addmm`, SDPA, eager
attention's `matmul`, a functional `F.linear`).

On a CPU with native bf16 (AMX, AVX512-BF16) the matrix products stay on torch's bf16 kernels, but torch's
bf16 flash-attention backward carries a fixed cost per (batch, head) that dominates when a head's rows are
short. Causal SDPA forward + backward at (batch 4, heads 256 / head size, T, head size), bf16 time over the
time with fp32 kernels (operands upcast, result rounded to bf16), one thread of a 2-core AMX Xeon, torch 2.13:

    head size   T x head size <= 16384: fp32 kernels faster      above: bf16 kernels as fast or faster
    32          T 64: 4.5x, 128: 3.4x, 256: 1.6x, 512: 1.2x      T 768: 1.05x
    64          T 64: 2.9x, 128: 2.3x, 192: 1.2x, 256: 1.1x      T 384: 0.87x, 512: 0.82x, 768: 0.69x
    128         T 64: 1.9x, 128: 1.5x                            T 192: 0.87x, 256: 0.68x, 768: 0.52x

So there, SDPA on bf16 tensors runs on fp32 kernels when (longest of query and key length) x head size is
at most FP32_ATTENTION_MAX (a fixed rule, not a timing made per run: two runs of one command compute the same
numbers). The `tiny` preset at sequence 256 (T x head size 8192) trains ~1.1-1.2x faster per step for it.
A model that takes its attention from transformers' attention interface (Llama, GPT-2, BERT and most others)
gets the rule as an attention implementation of its own, SHORT_ATTENTION (HF's SDPA function with the rule;
HF's SDPA masks), so nothing else in its forward is intercepted: through the TorchFunctionMode instead, every
torch call of the forward passes through Python, ~2.5% of a `tiny` bf16 step (one process, alternating steps).
Other models get the mode. The implementation's name lives in the model object only: a saved config.json
carries none, and the model loads elsewhere with transformers' own SDPA.
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


# On a CPU with native bf16: the largest (query or key length) x head size at which SDPA runs on fp32 kernels.
FP32_ATTENTION_MAX = 16384


SHORT_ATTENTION = "sdpa_short_on_fp32"  # the attention implementation (transformers' registry) of the rule


def _sdpa_short_on_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention function, short bf16 CPU attention on fp32 kernels (bf16 result)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _is_cpu_bf16(query) and _short_attention((query, key), {}):
        out, weights = sdpa_attention_forward(module, *_upcast((query, key, value, attention_mask)), **kwargs)
        return _round(out), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _use_short_attention_implementation(model: torch.nn.Module) -> bool:
    """Give an HF model that uses transformers' SDPA the rule as its attention implementation; False when it
    has no such attention (another implementation, or a model outside transformers' attention interface)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SHORT_ATTENTION, _sdpa_short_on_fp32)
    AttentionMaskInterface.register(SHORT_ATTENTION, sdpa_mask)  # the masks transformers makes for SDPA
    try:
        model.set_attn_implementation(SHORT_ATTENTION)
    except (ValueError, ImportError, NotImplementedError):
        return False
    return model.config._attn_implementation == SHORT_ATTENTION


def _short_attention(args, kwargs) -> bool:
    """SDPA's (B, H, T, D) operands: whether max(T_query, T_key) x D <= FP32_ATTENTION_MAX."""
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs["key"]
    return max(q.shape[-2], k.shape[-2]) * q.shape[-1] <= FP32_ATTENTION_MAX


class Fp32KernelsForBf16(TorchFunctionMode):
    """While active: bf16 CPU matrix products (see UPCAST and F.linear) run in fp32, results in bf16; with
    `attention_only`, SDPA alone and only short attention (a CPU with native bf16, where the rest is fast)."""

    def __init__(self, attention_only: bool = False):
        super().__init__()
        self.attention_only = attention_only

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.attention_only:
            if (func is F.scaled_dot_product_attention and any(_is_cpu_bf16(a) for a in (*args, *kwargs.values()))
                    and _short_attention(args, kwargs)):
                return _round(func(*_upcast(args), **{k: _upcast(v) for k, v in kwargs.items()}))
            return func(*args, **kwargs)
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
    """Make `model`'s bf16 CPU matrix products use fp32 kernels (see the module docstring): all of them on a
    CPU without native bf16, short attention only on one with it. A no-op, returning the model untouched, when
    the model never runs on a CPU."""
    if torch.cuda.is_available():
        return model
    native = not cpu_lacks_native_bf16()
    if native and _use_short_attention_implementation(model):
        return model
    mode = Fp32KernelsForBf16(attention_only=native)
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
        if not mode.attention_only and type(module).forward is torch.nn.Linear.forward:
            module.forward = types.MethodType(_linear_forward, module)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)  # also when forward raises
    return model
