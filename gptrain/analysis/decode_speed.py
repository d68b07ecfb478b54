"""Decoding speed against its floor. A decoding step multiplies every weight matrix once, whatever the batch, so at
batch 1 it cannot beat (copy bandwidth) / (bytes of the matrices) tokens per second; `gptrain bench` reports the
share of that limit a model reaches at batch 1 (as `gptrain sample` decodes: on CUDA the static cache and the
compiled step) and at a batch of 16 sequences (16 tokens per read of the weights).

    python -m gptrain.analysis.decode_speed --json FILE    # on CUDA: the compiled static path against eager

measures GPT-2 124M's shape with random weights in bfloat16 at batch 1, the compiled static path against the eager
KV cache and against the bandwidth limit (scripts/gpu_check.py judges the figures)."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from gptrain.generation import prepare_for_decoding
from gptrain.model import GPT, GPTConfig
from gptrain.runtime.int8_linear import Int8Linear
from gptrain.runtime.packed_linear import PackedLinear

BATCH = 16  # the batched figure: as many sequences as a busy `gptrain serve` decodes side by side
COPY_BYTES = 256 * 2**20  # larger than a 2-core machine's share of any cache, so the copy runs from memory


@dataclass
class DecodeSpeed:
    new_tokens: int
    weight_bytes: int  # bytes of the matrices one decoding step multiplies, in the dtype it decodes in
    copy_gb_per_s: float  # reads plus writes, as STREAM counts a copy
    tokens_per_s: float  # batch 1, KV cache, the device's decode mode (CUDA: static cache, compiled)
    batch_tokens_per_s: float  # BATCH sequences, KV cache, eager
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
        elif isinstance(module, Int8Linear):
            total += module.values.numel() + module.scales.numel() * module.scales.element_size()
    return total


def copy_bandwidth(device: torch.device, timer) -> float:
    """GB/s of a large device-memory copy, reads plus writes, the median of five."""
    source = torch.ones(COPY_BYTES // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # first touch: page faults are not bandwidth
    seconds = statistics.median(timer(lambda: target.copy_(source)) for _ in range(5))
    return 2 * COPY_BYTES / seconds / 1e9


def sampling_rate(model: nn.Module, device: torch.device, timer, new_tokens: int, batch: int = 1,
                  use_kv_cache: bool = True) -> float:
    """Tokens per second of generate() from one-token prompts, sampling as `gptrain sample` does (top_k 200), after
    a warm-up of 8 tokens (which compiles the step of the compiled mode: its cache has the same size)."""
    prompt = torch.zeros((batch, 1), dtype=torch.long, device=device)
    model.generate(prompt, 8, use_kv_cache=use_kv_cache)
    seconds = timer(lambda: model.generate(prompt, new_tokens, top_k=200, use_kv_cache=use_kv_cache))
    return batch * new_tokens / seconds


@torch.no_grad()
def measure_decoding(model: nn.Module, device: torch.device, dtype_name: str, timer, new_tokens: int) -> DecodeSpeed:
    """Decoding speeds of a copy of the model prepared as `gptrain sample` prepares it. The batch of BATCH and the
    recomputing figures decode eagerly: a server's batches do (SlotCache), and a second compiled step would
    double the compile time."""
    model = copy.deepcopy(model)
    prepare_for_decoding(model, device, dtype_name)
    tokens_per_s = sampling_rate(model, device, timer, new_tokens)
    model.decode_mode = "eager"
    return DecodeSpeed(new_tokens=new_tokens, weight_bytes=matmul_weight_bytes(model),
                       copy_gb_per_s=copy_bandwidth(device, timer), tokens_per_s=tokens_per_s,
                       batch_tokens_per_s=sampling_rate(model, device, timer, new_tokens, BATCH),
                       recompute_tokens_per_s=sampling_rate(model, device, timer, new_tokens, use_kv_cache=False))


@dataclass
class StaticDecodeSpeed:
    new_tokens: int
    weight_bytes: int
    copy_gb_per_s: float
    eager_tokens_per_s: float  # batch 1, the KVCache that grows, eager
    compiled_tokens_per_s: float  # batch 1, the StaticCache, its step compiled
    compile_seconds: float  # the compiled path's warm-up: compiling (and on CUDA recording the graph)

    @property
    def limit_tokens_per_s(self) -> float:
        return self.copy_gb_per_s * 1e9 / self.weight_bytes

    @property
    def speedup(self) -> float:
        return self.compiled_tokens_per_s / self.eager_tokens_per_s

    @property
    def bandwidth_share(self) -> float:
        return self.compiled_tokens_per_s / self.limit_tokens_per_s

    def as_dict(self) -> dict:
        return {**asdict(self), "limit_tokens_per_s": self.limit_tokens_per_s, "speedup": self.speedup,
                "bandwidth_share": self.bandwidth_share}


@torch.no_grad()
def measure_static_decoding(model: nn.Module, device: torch.device, dtype_name: str, timer,
                            new_tokens: int) -> StaticDecodeSpeed:
    """Batch-1 tokens per second of a copy of the model decoding eagerly on a KVCache and compiled on a StaticCache."""
    model = copy.deepcopy(model)
    prepare_for_decoding(model, device, dtype_name, decode_mode="compiled")  # both on the same, plain weights
    model.decode_mode = "eager"
    eager = sampling_rate(model, device, timer, new_tokens)
    model.decode_mode = "compiled"
    compile_seconds = timer(lambda: model.generate(torch.zeros((1, 1), dtype=torch.long, device=device), 8))
    return StaticDecodeSpeed(new_tokens=new_tokens, weight_bytes=matmul_weight_bytes(model),
                             copy_gb_per_s=copy_bandwidth(device, timer), eager_tokens_per_s=eager,
                             compiled_tokens_per_s=sampling_rate(model, device, timer, new_tokens),
                             compile_seconds=compile_seconds)


def device_timer(device: torch.device):
    """Seconds one call of fn takes, the device's queued work included."""
    def timer(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    return timer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="GPT-2 124M (random weights) decoding at batch 1: the compiled "
                                                 "static path against eager and against the bandwidth limit")
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(1337)
    model = GPT(GPTConfig()).to(device)  # GPT-2 124M's shape: the weights' bytes, not their values, set the speed
    figures = measure_static_decoding(model, device, args.dtype, device_timer(device), args.new_tokens).as_dict()
    args.json.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
