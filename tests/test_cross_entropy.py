"""pipeline/models/cross_entropy.py: the chunked LM loss gives the HF models' own loss and gradient."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.models.cross_entropy import IGNORE, lm_loss


def reference(logits, labels, shift):
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [True, False])
def test_loss_and_gradient_equal_plain_cross_entropy(dtype, shift, monkeypatch):
    monkeypatch.setattr("pipeline.models.cross_entropy.chunk_rows", lambda vocab: 5)  # several chunks, a ragged last
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 11) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 11, (3, 7))
    labels[0, 2] = labels[2, 5] = IGNORE
    ref = reference(logits, labels, shift)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    loss = lm_loss(logits, labels, shift)
    (grad,) = torch.autograd.grad(loss * 1.0, logits)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(grad.float(), ref_grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-3)


def test_no_labelled_token_gives_zero_not_nan():
    logits = torch.randn(1, 4, 6, requires_grad=True)
    loss = lm_loss(logits, torch.full((1, 4), IGNORE), shift=False)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_equals_the_loss_an_hf_model_returns_with_labels():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(0, 50, (2, 9))
    out = model(input_ids=ids, labels=ids)
    assert torch.allclose(lm_loss(out.logits, ids, shift=True), out.loss, atol=1e-6)


def test_num_items_divides_the_sum_as_hf_does():
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3] = IGNORE
    ref = ForCausalLMLoss(logits, labels, vocab_size=7, num_items_in_batch=13)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    loss = lm_loss(logits, labels, shift=True, num_items=13)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(loss, ref, atol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-7)
