"""Inference modules for quantized weights, and the choice of CPU kernel.

`QuantLinear` replaces a Linear / GPT-2 Conv1D whose weight is stored as integers. Two runtimes:
- "int8": the weight as symmetric per-output-channel int8, packed for PyTorch's dynamic int8 CPU kernel
  (`quantized::linear_dynamic`, FBGEMM/x86): each call quantizes its input to 8 bits with the range of
  the batch, multiplies int8 x int8 and rescales. Int4 and grouped weights are re-expressed per channel
  at 8 bits when loading (a change far below their own quantization step). Fastest on CPU: measured
  here ~1.6x faster than fp32 for a 512x512 by 2048 layer on 2 AVX2 cores. The kernel's input is
  quantized with `reduce_range` (7 bits): on CPUs without VNNI the 8-bit product pairs can saturate.
- "float": the dequantized weight in float32 and, where the model trained with activation
  quantization, the same per-tensor fake quantization: exactly the numbers the training forward used.
"auto" is "int8" where the kernel is available and "float" elsewhere.

`QuantEmbedding` keeps the table as bytes and dequantizes only the rows looked up.

PyTorch 2.13 marks its quantized-tensor constructors deprecated (a UserWarning); they are the way to
pack a weight for this kernel, which has no replacement as fast on CPU yet, so the warning is silenced
where the weight is packed and the float runtime stands ready for when the kernel goes away.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.compression.quant import dequantize, fake_quantize_activation
from pipeline.compression.schema import QuantScheme

RUNTIMES = ("auto", "int8", "float")


@functools.cache
def int8_kernel_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = torch.quantize_per_channel(torch.ones(2, 2), torch.ones(2, dtype=torch.double),
                                           torch.zeros(2, dtype=torch.long), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(w, None)
            torch.ops.quantized.linear_dynamic(torch.ones(1, 2), packed, True)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def resolve_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "auto":
        return "int8" if int8_kernel_available() else "float"
    if runtime == "int8" and not int8_kernel_available():
        raise RuntimeError("this PyTorch build has no dynamic int8 CPU kernel (quantized::linear_dynamic); "
                           "use runtime='float'")
    return runtime


class QuantLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, runtime: str,
                 act_bits: int | None = None, act_symmetric: bool = False):
        """weight: the dequantized float32 weight (out, in)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.runtime = runtime
        self.act_bits, self.act_symmetric = act_bits, act_symmetric
        if runtime == "int8":
            scale = (weight.abs().amax(1) / 127).clamp_min(1e-12).double()  # symmetric per row: codes in [-127, 127]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # see the module docstring
                q = torch.quantize_per_channel(weight.float(), scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                               torch.qint8)
                self._packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.float())
            self.register_buffer("weight", None, persistent=False)
            self.register_buffer("bias", None, persistent=False)
        else:
            self.register_buffer("weight", weight.float().contiguous(), persistent=False)
            self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runtime == "int8":
            return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, True).to(x.dtype)
        if self.act_bits:
            x = fake_quantize_activation(x, self.act_bits, self.act_symmetric)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, runtime={self.runtime}"


class QuantEmbedding(nn.Module):
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme,
                 padding_idx: int | None = None):
        """codes: uint8 (num_embeddings, dim), one code per byte; scale / zero: (num_embeddings, groups)."""
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.scheme, self.padding_idx = scheme, padding_idx
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale", scale.float(), persistent=False)
        self.register_buffer("zero", zero, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.codes[flat], self.scale[flat], None if self.zero is None else self.zero[flat], self.scheme)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.scheme)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.scheme.bits}"
