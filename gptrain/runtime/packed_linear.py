"""Linear layers for decoding on a CPU: each weight reordered once into oneDNN's blocked layout.

A decoding step multiplies one row by every weight matrix, so it is bound by reading the weights. PyTorch's plain
bfloat16 linear re-lays out its operand on every call and reaches ~16 GB/s on a 2-core AMX Xeon (26 GB/s copy
bandwidth), no faster than float32 at twice the bytes; with the weight reordered in advance it reaches ~22 GB/s
and computes the same numbers. In float32 the plain linear (MKL's matrix-vector product) reads 13-14 GB/s on a
2-core EPYC without AVX-512 whatever the threads, oneDNN's packed one 19 GB/s with two threads (and 1.7x the plain
speed at 16 rows, a server's batch); its sums run in another order, so float32 logits move in the last bits
(greedy tokens can differ where two are nearly tied; perplexity does not move: tests/test_decoding.py). This is
what torch.compile's freezing pass does to linears (through the same two mkldnn operators), without compile's
15-30 s start-up, which a CPU decode does not win back (measured in docs/measurements.md)."""

from __future__ import annotations

import torch
from torch import nn

from gptrain.runtime.linear_swap import replace_linears

# Row count the oneDNN layout is tuned for: a decoding step's one row per sequence. Other counts (a prefill) still
# compute correctly; the figures were the same for 1 and 16 rows.
ROWS_HINT = 1


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x W^T + b for inference, with W held in oneDNN's layout (it is no longer a parameter)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [None], "")  # (..., out)


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of a CPU model being prepared for decoding with a PackedLinear; returns how many."""
    return replace_linears(model, PackedLinear)
