"""pipeline/models/cpu_bf16.py: bf16 matrix products on fp32 kernels give bf16 results equal to torch's bf16
kernels (up to summation order), gradients included, and leave everything else alone."""
import torch
import torch.nn.functional as F

from pipeline.models import cpu_bf16


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_linear_matches_bf16_kernel_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16).bfloat16().requires_grad_()
    w = torch.randn(8, 16).bfloat16().requires_grad_()
    b = torch.randn(8).bfloat16().requires_grad_()
    ref = F.linear(x, w, b)
    ref.float().square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    with cpu_bf16.Fp32KernelsForBf16():
        out = F.linear(x, w, b)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2
    for t, g in zip((x, w, b), grads):
        assert t.grad.dtype == torch.bfloat16 and rel(t.grad, g) < 1e-2


def test_sdpa_and_matmul_return_bf16_close_to_bf16_kernels():
    torch.manual_seed(0)
    q = torch.randn(2, 2, 8, 4).bfloat16()
    with cpu_bf16.Fp32KernelsForBf16():
        att = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        mm = q @ q.transpose(-1, -2)
    assert att.dtype == mm.dtype == torch.bfloat16
    assert rel(att, F.scaled_dot_product_attention(q, q, q, is_causal=True)) < 1e-2
    assert rel(mm, q @ q.transpose(-1, -2)) < 1e-2


def test_fp32_passes_through_unchanged():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with cpu_bf16.Fp32KernelsForBf16():
        out = F.linear(x, w)
    assert torch.equal(out, F.linear(x, w))


def test_model_hooks_only_on_cpus_without_native_bf16(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    monkeypatch.setattr(cpu_bf16, "cpu_lacks_native_bf16", lambda: False)
    assert cpu_bf16.use_fp32_kernels_for_bf16(model) is model and not model._forward_pre_hooks
    monkeypatch.setattr(cpu_bf16, "cpu_lacks_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_bf16.use_fp32_kernels_for_bf16(model)
    seen = []
    original = cpu_bf16._LinearInFp32.apply
    monkeypatch.setattr(cpu_bf16._LinearInFp32, "apply", lambda *a: seen.append(1) or original(*a))
    x = torch.randn(2, 8)
    assert torch.equal(model(x), model[1](model[0](x)))  # fp32 parameters: nothing diverted
    assert not seen
    model.bfloat16()  # as DeepSpeed's bf16 mode casts it, in place
    out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16 and len(seen) == 2
    assert not torch.overrides._get_current_function_mode_stack()  # the mode is left after forward
