"""bitsandbytes linears that quantize their weight the moment the checkpoint loader assigns it, so a model built
on the meta device is quantized layer by layer and never holds its full-precision linears (imported only when
``quantize=`` asks for it: it imports bitsandbytes).

Layout (docs/quant-formats.md §6): nf4 / fp4 pack two 4-bit codes per byte with one absmax per block of 64
weights, the absmax themselves 8-bit-quantized in blocks of 256 (double quantization); int8 stores one
int8 row per output feature and its fp32 absmax scale (LLM.int8() without outlier columns)."""
from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

BLOCK_SIZE = 64  # weights per absmax in nf4 / fp4 (bitsandbytes' default)


class _QuantizeOnAssign:
    """Quantize ``weight`` when a real (non-meta) full-precision tensor is assigned to it."""

    def __setattr__(self, name, value):
        if name == "weight" and isinstance(value, torch.Tensor) and not value.is_meta and value.is_floating_point():
            value = self.quantized(value.detach())
        super().__setattr__(name, value)


class StreamedLinear4bit(_QuantizeOnAssign, bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` (nf4 or fp4, double-quantized absmax) whose weight quantizes on assignment."""

    def quantized(self, weight: torch.Tensor) -> bnb.nn.Params4bit:
        param = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=BLOCK_SIZE, compress_statistics=True,
                                  quant_type=self.weight.quant_type, module=self)
        return param._quantize(weight.device)  # data becomes the packed codes [N*K/2, 1] uint8


class StreamedLinear8bit(_QuantizeOnAssign, bnb.nn.Linear8bitLt):
    """``bnb.nn.Linear8bitLt`` (int8 rows, one absmax scale each, no outlier threshold) whose weight quantizes
    on assignment."""

    def quantized(self, weight: torch.Tensor) -> bnb.nn.Int8Params:
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        return param._quantize(weight.device)  # data becomes int8 [N, K], SCB fp32 [N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] -> [..., N]`` in ``x``'s dtype; the int8 matmul takes fp16 input (cast here, as bitsandbytes
        would, without its per-call warning)."""
        return super().forward(x.to(torch.float16)).to(x.dtype)


def streamed_linear(linear: nn.Linear, method: str, compute_dtype: torch.dtype) -> nn.Linear:
    """A meta-device bitsandbytes layer of ``linear``'s shape and bias for ``method`` (nf4, fp4 or int8), computing
    in ``compute_dtype``."""
    bias = linear.bias is not None
    if method == "int8":
        return StreamedLinear8bit(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                  threshold=0.0, device="meta")
    return StreamedLinear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type=method, device="meta")
