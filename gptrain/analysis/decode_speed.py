"""Decoding speed against its floor. A decoding step multiplies every weight matrix once, whatever the batch, so at
batch 1 it cannot beat (copy bandwidth) / (bytes of the matrices) tokens per second; `gptrain bench` reports the
share of that limit a model reaches at batch 1 and at a batch of 16 sequences (16 tokens per read of the weights)."""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from gptrain.generation import prepare_for_decoding
from gptrain.runtime.packed_linear import PackedLinear

BATCH = 16  # the batched figure: as many sequences as a busy `gptrain serve` decodes side by side
COPY_BYTES = 256 * 2**20  # larger than a 2-core machine's share of any cache, so the copy runs from memory


@dataclass
class DecodeSpeed:
    new_tokens: int
    weight_bytes: int  # bytes of the matrices one decoding step multiplies, in the dtype it decodes in
    copy_gb_per_s: float  # reads plus writes, as STREAM counts a copy
    tokens_per_s: float  # batch 1, KV cache
    batch_tokens_per_s: float  # BATCH sequences, KV cache
    recompute_tokens_per_s: float  # batch 1, the whole window recomputed at every step

    @property
    def limit_tokens_per_s(self) -> float:
        return self.copy_gb_per_s * 1e9 / self.weight_bytes

    @property
    def bandwidth_share(self) -> float:
        return self.tokens_per_s / self.limit_tokens_per_s

    @property
    def batch_bandwidth_share(self) -> float:
        return self.batch_tokens_per_s / (BATCH * self.limit_tokens_per_s)


def matmul_weight_bytes(model: nn.Module) -> int:
    """Bytes of every matrix a decoding step multiplies by (the tied head counted once, as the step reads it once
    as the head; an embedding lookup reads one row, so the tables are not counted)."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, PackedLinear):
            total += module.in_features * module.out_features * module.packed_weight.element_size()
    return total


def copy_bandwidth(device: torch.device, timer) -> float:
    """GB/s of a large device-memory copy, reads plus writes, the median of five."""
    source = torch.ones(COPY_BYTES // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # first touch: page faults are not bandwidth
    seconds = statistics.median(timer(lambda: target.copy_(source)) for _ in range(5))
    return 2 * COPY_BYTES / seconds / 1e9


@torch.no_grad()
def measure_decoding(model: nn.Module, device: torch.device, dtype_name: str, timer, new_tokens: int) -> DecodeSpeed:
    """Tokens per second of generate() from one-token prompts, sampling as `gptrain sample` does (top_k 200), on a
    copy of the model prepared as `gptrain sample` prepares it."""
    model = copy.deepcopy(model)
    prepare_for_decoding(model, device, dtype_name)

    def rate(batch: int, use_kv_cache: bool = True) -> float:
        prompt = torch.zeros((batch, 1), dtype=torch.long, device=device)
        model.generate(prompt, 8, use_kv_cache=use_kv_cache)  # warm-up
        seconds = timer(lambda: model.generate(prompt, new_tokens, top_k=200, use_kv_cache=use_kv_cache))
        return batch * new_tokens / seconds

    return DecodeSpeed(new_tokens=new_tokens, weight_bytes=matmul_weight_bytes(model),
                       copy_gb_per_s=copy_bandwidth(device, timer), tokens_per_s=rate(1),
                       batch_tokens_per_s=rate(BATCH), recompute_tokens_per_s=rate(1, use_kv_cache=False))
