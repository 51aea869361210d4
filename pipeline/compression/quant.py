"""Integer quantization of weights and activations: fake quantization for training, integers for storage.

A weight is seen as a matrix (out, in): rows are output channels (an embedding's rows are tokens).
Scales are per row (group_size 0) or per group of `group_size` consecutive input columns, so that
`scales` is (out, ceil(in / group_size)) (a last, shorter group takes the remainder):

    symmetric,  b bits:  q in [-(2^(b-1) - 1), 2^(b-1) - 1],  w ~ q * s,        s = max|w| / (2^(b-1) - 1)
    asymmetric, b bits:  q in [0, 2^b - 1],                   w ~ (q - z) * s,  s = (max - min) / (2^b - 1)

with min <= 0 <= max, so that 0 is always exact (pruned weights stay exactly 0 after quantization).
Training uses `fake_quantize`: the forward pass sees the dequantized values, the backward pass the
identity (straight-through estimator). Storage uses `quantize` / `dequantize`, which give exactly the
values the forward pass saw: `dequantize(*quantize(w)) == fake_quantize(w)`.

Stored codes are unsigned bytes, `q + 2^(b-1)` for symmetric, so one path serves every scheme; 4-bit
codes are packed two per byte (`pack_nibbles`). Arithmetic is in float32 whatever the weight's dtype.
"""
from __future__ import annotations

import torch

from pipeline.compression.schema import QuantScheme

EPS = 1e-12  # the smallest scale: an all-zero row quantizes to zeros instead of dividing by zero


def qrange(scheme: QuantScheme) -> tuple[int, int]:
    if scheme.symmetric:
        top = 2 ** (scheme.bits - 1) - 1
        return -top, top
    return 0, 2 ** scheme.bits - 1


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, groups, size), one group per row when group_size is 0. A last short group
    is padded with zeros, which change no range (every range includes 0); `_ungroup` drops them."""
    out, cols = w.shape
    size = group_size or cols
    pad = (-cols) % size
    if pad:
        w = torch.cat([w, w.new_zeros(out, pad)], dim=1)
    return w.reshape(out, (cols + pad) // size, size)


def _ungroup(g: torch.Tensor, cols: int) -> torch.Tensor:
    return g.reshape(g.shape[0], -1)[:, :cols]


def quantize(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes uint8 (out, in), scales float32 (out, groups), zero points uint8 (out, groups) or None)."""
    g = _groups(w.detach().float(), scheme.group_size)
    lo, hi = qrange(scheme)
    if scheme.symmetric:
        scale = (g.abs().amax(-1) / hi).clamp_min(EPS)                        # (out, groups)
        q = torch.round(g / scale[..., None]).clamp(lo, hi)
        codes = (q + 2 ** (scheme.bits - 1)).to(torch.uint8)
        return _ungroup(codes, w.shape[1]), scale, None
    low, high = g.amin(-1).clamp_max(0), g.amax(-1).clamp_min(0)
    scale = ((high - low) / hi).clamp_min(EPS)
    zero = torch.round(-low / scale).clamp(lo, hi)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(lo, hi)
    return _ungroup(q.to(torch.uint8), w.shape[1]), scale, zero.to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               scheme: QuantScheme) -> torch.Tensor:
    """float32 (out, in) from the stored codes (any leading rows: an embedding dequantizes only the rows looked up)."""
    cols = codes.shape[-1]
    g = _groups(codes.reshape(-1, cols).float(), scheme.group_size)
    s = scale.reshape(g.shape[0], g.shape[1], 1)
    if zero is None:
        w = (g - 2 ** (scheme.bits - 1)) * s
    else:
        w = (g - zero.reshape(g.shape[0], g.shape[1], 1).float()) * s
    return _ungroup(w, cols).reshape(codes.shape)


def fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The dequantized weight in the forward pass, the identity in the backward pass; w's dtype."""
    q = dequantize(*quantize(w, scheme), scheme).to(w.dtype)
    return w + (q - w).detach()


def fake_quantize_activation(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Dynamic per-tensor fake quantization of an activation (the range of this batch), straight-through.
    Asymmetric is uint8 with a zero point, as the dynamic int8 CPU kernels quantize their input."""
    xf = x.detach().float()
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale = (xf.abs().amax() / top).clamp_min(EPS)
        q = torch.round(xf / scale).clamp(-top, top) * scale
    else:
        top = 2 ** bits - 1
        low, high = xf.amin().clamp_max(0), xf.amax().clamp_min(0)
        scale = ((high - low) / top).clamp_min(EPS)
        zero = torch.round(-low / scale)
        q = (torch.round(xf / scale + zero).clamp(0, top) - zero) * scale
    return x + (q.to(x.dtype) - x).detach()


# ---------------------------------------------------------------- storage

def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8 < 16, any shape) -> bytes, two codes per byte (low nibble first), flattened;
    an odd count is padded with one zero nibble."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` 4-bit codes of `packed`, flat uint8."""
    both = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return both[:count]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (any shape) -> bytes, 8 flags per byte, flattened."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:count].bool()
