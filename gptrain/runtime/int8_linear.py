"""Linear layers for decoding on a CPU with 8-bit weights: each weight matrix stored as int8 with one scale per
output row ("weight-only" quantization); the inputs stay in floating point, so each sequence's numbers are its own
whoever it is batched with.

A decoding step reads every weight matrix once, so a quarter of float32's bytes is the lever. The kernel is
PyTorch's `_weight_int8pack_mm`, the one torchao's int8 weight-only layout runs on a CPU once compiled; called
directly it needs no compiling (torchao 0.18's Int8WeightOnlyConfig in eager mode dequantized every weight on every
call: 4x slower than float32). It takes bfloat16 inputs: with float32 ones it ran a scalar loop (~1.2 GB/s of
weights on a 2-core EPYC without AVX-512, against ~6-7 with bfloat16). So each input row is rounded to bfloat16,
and each output too, before the float32 bias: held-out perplexity stays within 1% of float32's
(tests/test_decoding.py). Also measured there and left: FBGEMM's dynamic int8 linear (`quantize_dynamic`), ~1.5x
faster still, quantizes its inputs with one scale per call, so a served sequence's tokens would depend on the
other sequences decoded beside it.

The kernel steps through each row 16 int8 weights at a time with aligned vector loads (8 with AVX2) and checks
neither: a row of another length read past its end (wrong sums, or a crash). So a linear whose input width is not
a multiple of 16 (a SwiGLU hidden size of 85, say) stays float32; GPT widths (64, 384, 768, ...) all are."""

from __future__ import annotations

import torch
from torch import nn

from gptrain.runtime.linear_swap import replace_linears

ROW_STEP = 16  # weights per vector load of the kernel's widest (AVX-512) path


def int8_supported(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """y = x W^T + b for inference, W as int8 values times a bfloat16 scale per output row (no longer a
    parameter); x and y float32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): the row's largest magnitude -> 127
        values = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)
        self.register_buffer("bias", linear.bias.detach().float() if linear.bias is not None else None,
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is float32, so this is a fresh contiguous copy, as the kernel's aligned loads need (rows of 16 bfloat16
        # values start on 32-byte boundaries).
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16, memory_format=torch.contiguous_format)  # (N, in)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.values, self.scales).float()  # (N, out)
        y = y.view(*x.shape[:-1], self.out_features)  # (..., out)
        return y + self.bias if self.bias is not None else y


def quantize_linears(model: nn.Module) -> int:
    """Replace the nn.Linear layers of a float32 CPU model being prepared for decoding with Int8Linear ones, those
    whose input width the kernel can step through; returns how many."""
    return replace_linears(model, lambda linear: Int8Linear(linear) if linear.in_features % ROW_STEP == 0 else None)
