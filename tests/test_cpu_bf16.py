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


def test_model_hooks_divert_linears_only_on_cpus_without_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = []
    original = cpu_bf16._LinearInFp32.apply
    monkeypatch.setattr(cpu_bf16._LinearInFp32, "apply", lambda *a: seen.append(1) or original(*a))
    x = torch.randn(2, 8)
    for native in (True, False):
        monkeypatch.setattr(cpu_bf16, "cpu_lacks_native_bf16", lambda native=native: not native)
        model = cpu_bf16.use_fp32_kernels_for_bf16(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)))
        assert torch.equal(model(x), model[1](model[0](x)))  # fp32 parameters: nothing diverted
        assert not seen
        model.bfloat16()  # as DeepSpeed's bf16 mode casts it, in place
        out = model(x.bfloat16())
        assert out.dtype == torch.bfloat16 and len(seen) == (0 if native else 2)
        assert not torch.overrides._get_current_function_mode_stack()  # the mode is left after forward
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = torch.nn.Linear(8, 8)
    assert cpu_bf16.use_fp32_kernels_for_bf16(model) is model and not model._forward_pre_hooks


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):  # (B, H, T, D=8)
        return F.scaled_dot_product_attention(self.proj(x), x, x, is_causal=True)


def test_short_attention_only_on_fp32_kernels_on_a_native_bf16_cpu(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "cpu_lacks_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    model = cpu_bf16.use_fp32_kernels_for_bf16(Attention()).bfloat16()
    assert "forward" not in vars(model.proj)  # the linear keeps torch's bf16 kernel
    upcast = []
    original = cpu_bf16._upcast
    monkeypatch.setattr(cpu_bf16, "_upcast", lambda v: upcast.append(1) or original(v))
    x = torch.randn(2, 2, 6, 8).bfloat16()  # T x head size 48: short
    out = model(x)
    q = model.proj(x)  # outside the model's forward: no mode, torch's bf16 linear
    ref = F.scaled_dot_product_attention(q.float(), x.float(), x.float(), is_causal=True).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref) and upcast
    assert not torch.overrides._get_current_function_mode_stack()
    monkeypatch.setattr(cpu_bf16, "FP32_ATTENTION_MAX", 47)  # now above it: torch's bf16 kernels
    upcast.clear()
    assert torch.equal(model(x), F.scaled_dot_product_attention(q, x, x, is_causal=True)) and not upcast


def test_short_attention_rule_takes_the_longer_of_query_and_key():
    q, k = torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 256, 64)  # one query (decoding) against 256 keys
    assert cpu_bf16._short_attention((q, k, k), {})
    assert not cpu_bf16._short_attention((q, torch.zeros(1, 1, 257, 64)), {})
    assert cpu_bf16._short_attention((), {"query": k, "key": q, "value": q})


def test_hf_model_gets_the_attention_rule_as_its_attention_implementation(monkeypatch, tmp_path):
    import json

    from transformers import AutoModelForCausalLM, LlamaConfig

    monkeypatch.setattr(cpu_bf16, "cpu_lacks_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=50, max_position_embeddings=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    plain.load_state_dict(model.state_dict())
    model = cpu_bf16.use_fp32_kernels_for_bf16(model).bfloat16()
    plain = plain.bfloat16()
    assert model.config._attn_implementation == cpu_bf16.SHORT_ATTENTION and not model._forward_pre_hooks
    x = torch.randint(0, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding: transformers' SDPA mask reaches the rule
    with cpu_bf16.Fp32KernelsForBf16(attention_only=True):  # the same rule through the mode
        expected = [plain(input_ids=x).logits, plain(input_ids=x, attention_mask=mask).logits]
    upcast = []
    original = cpu_bf16._upcast
    monkeypatch.setattr(cpu_bf16, "_upcast", lambda v: upcast.append(1) or original(v))
    assert torch.equal(model(input_ids=x).logits, expected[0])
    assert torch.equal(model(input_ids=x, attention_mask=mask).logits, expected[1])
    calls = len(upcast)
    assert calls  # the rule ran
    monkeypatch.setattr(cpu_bf16, "FP32_ATTENTION_MAX", 1)  # long attention: torch's own bf16 kernels
    assert torch.equal(model(input_ids=x).logits, plain(input_ids=x).logits) and len(upcast) == calls
    model.save_pretrained(tmp_path)  # the implementation stays in this process: the saved config names none
    assert not any("attn" in key for key in json.loads((tmp_path / "config.json").read_text()))
