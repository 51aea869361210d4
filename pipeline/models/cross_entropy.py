"""The language-model loss without an fp32 copy of the logits: cross-entropy taken a chunk of rows at a time.

A HuggingFace causal or masked LM given `labels` computes its loss from `logits.float()`: for (B, T, V) bf16
logits that is a full fp32 copy, an fp32 log-softmax of the same size, and in backward an fp32 gradient that is
zero-filled, scattered into and cast back to bf16: five passes over B x T x V x 4 bytes, 262 MB each for
2 x 1024 tokens at a 32k vocabulary. `lm_loss` computes the same number (mean over the labelled tokens, fp32
arithmetic) from `chunk` rows of logits at a time, upcast while they sit in cache, and writes the gradient
straight into the logits' dtype: measured on the 2-core AMX CPU (one thread, bf16), 1.2-1.7x faster for
(1024, 2000) and (2048, 32000) logits with 4 MB chunks (more with the 512 KB ones of `chunk_rows`), the loss
equal to 1e-6 and the gradient to 1e-8.

Under `pretrain --compile` it runs after the compiled model, in eager mode, as in an uncompiled run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a position without a loss (HF's convention)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: ~512 KB of fp32 logits, so that a chunk and its bf16 source stay in a core's L2 cache
    through the chunk's passes (copy, subtract, exp, scatter, scale). Measured on the 2-core AMX CPU (one thread,
    forward + backward, interleaved): against 4 MB chunks of at least 64 rows, 1.2-1.3x faster at (1024, 2000)
    and (2048, 32000) logits, 1.5x at (1024, 50000). At least 4 rows (fewer Python steps at huge vocabularies)."""
    return max(4, (1 << 19) // (4 * vocab))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (N, V) logits against (N,) targets (IGNORE: left out), in fp32 arithmetic, summed and
    divided by `num_items` (None: the number of labelled rows, the mean). Saves the logits themselves and one
    fp32 log-sum-exp per row; backward recomputes each chunk's softmax."""

    @staticmethod
    def forward(ctx, logits, targets, chunk: int, num_items):
        valid = targets != IGNORE
        safe = torch.where(valid, targets, 0)  # (N,) a real column for the ignored rows, masked out below
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
        for start in range(0, logits.shape[0], chunk):
            lse[start:start + chunk] = torch.logsumexp(logits[start:start + chunk].float(), dim=-1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()  # (N,) the target's logit
        if num_items is None:
            count = valid.sum().clamp_min(1)  # no labelled token: loss 0 (HF's mean would be nan)
        else:
            count = torch.as_tensor(num_items, dtype=torch.float32, device=logits.device)
        ctx.save_for_backward(logits, safe, valid, lse, count)
        ctx.chunk = chunk
        return ((lse - picked) * valid).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe, valid, lse, count = ctx.saved_tensors
        scale = (grad_loss / count) * valid  # (N,) d loss / d row loss; 0 for ignored rows
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            p = (logits[rows].float() - lse[rows, None]).exp_()  # softmax of the chunk, (n, V)
            p.scatter_add_(1, safe[rows, None], torch.full_like(p[:, :1], -1.0))  # softmax - one-hot
            grad[rows] = p.mul_(scale[rows, None])
        return grad, None, None, None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool, num_items=None) -> torch.Tensor:
    """Mean token cross-entropy of (B, T, V) logits against (B, T) labels (IGNORE positions left out), the loss an
    HF model returns when given `labels`. `shift`: causal LM, position t predicts label t + 1 (the last position
    predicts nothing); else each position its own label (masked LM). `num_items`: divide the sum by it instead of
    by this batch's labelled tokens (HF's `num_items_in_batch`: token-weighted across micro-batches)."""
    if shift:  # (B, T): label t+1 at t, IGNORE at the end; the logits stay whole (no copy of a slice)
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    vocab = logits.shape[-1]
    logits, targets = logits.reshape(-1, vocab), labels.reshape(-1)  # (B*T, V), (B*T,)
    return _ChunkedCrossEntropy.apply(logits, targets, chunk_rows(vocab), num_items)
