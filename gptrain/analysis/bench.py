"""`gptrain bench CONFIG`: measure training and decoding speed, in one process, after warm-up.

Figures are medians. The full step is exactly what `gptrain train` runs at a logged iteration (data, forward,
backward, accumulation, clipping, optimizer, metrics, and the update ratio at the iterations a run measures it);
it is timed in blocks of update_ratio_interval iterations, so that each block holds one measurement as a run
does, and a step's time is its block's over its length. The bare step is nanoGPT's step (its train.py's inner
loop): for each micro-batch the forward and backward passes and the next batch drawn, then the gradients clipped
to grad_clip, AdamW's step and zero_grad; what the full step adds to it (the loss and gradient-norm checks, the
health monitor, metrics, the console, the update ratio) is the loop's overhead. Both are timed in blocks alike,
the blocks alternating in rounds whose order flips each round (full, bare, then bare, full), so that a machine
whose speed drifts, or which favours whichever runs second, affects both alike.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from gptrain.analysis.decode_speed import device_timer, measure_decoding
from gptrain.config import TrainConfig
from gptrain.monitor.flops import device_name, peak_flops
from gptrain.monitor.metrics import finite_or_none
from gptrain.runtime.device import autocast
from gptrain.runtime.rng import TRAIN_STREAM
from gptrain.train import Trainer


@dataclass
class BenchResult:
    config: dict
    device: str
    dtype: str
    compile: bool
    torch_version: str
    threads: int
    python: str
    iters: int
    tokens_per_iter: int
    full_step_ms: float
    bare_step_ms: float
    loop_overhead: float  # full / bare
    tokens_per_s: float
    flops_per_token: int
    peak_tflops: float | None
    peak_source: str
    mfu: float | None
    loader_batches_per_s: float
    decode_new_tokens: int
    decode_weight_mb: float  # the matrices one decoding step reads, in the dtype `gptrain sample` decodes in
    copy_gb_per_s: float
    decode_tokens_per_s: float  # batch 1, KV cache
    decode_bandwidth_share: float  # of copy_gb_per_s / decode_weight_mb tokens/s
    decode_batch16_tokens_per_s: float
    decode_batch16_bandwidth_share: float
    decode_recompute_tokens_per_s: float
    kv_cache_speedup: float
    peak_memory_mb: float
    peak_memory_kind: str
    compile_seconds: float | None = None
    profile: str | None = field(default=None, repr=False)


def run_bench(config: TrainConfig, iters: int = 50, peak_tflops: float | None = None, profile: bool = False,
              sample_tokens: int = 500) -> BenchResult:
    trainer = Trainer(config)  # nothing is written: run() is never called
    timer = device_timer(trainer.device)
    compile_seconds = timer(lambda: _full_step(trainer, 0)) if trainer.compiled else None
    steps = _time_steps(trainer, timer, iters)
    flops_per_token = trainer.info.flops_per_token
    peak = peak_flops(trainer.device, trainer.dtype, peak_tflops)
    tokens_per_s = config.tokens_per_iter / (steps["full"] / 1000)
    decode = measure_decoding(trainer.model, trainer.device, trainer.config.dtype, timer, sample_tokens)
    memory, memory_kind = _peak_memory(trainer.device)
    return BenchResult(
        config={k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                                "gradient_accumulation_steps", "dataset")},
        device=device_name(trainer.device),
        dtype=trainer.info.dtype_name,
        compile=trainer.compiled,
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        iters=iters,
        tokens_per_iter=config.tokens_per_iter,
        full_step_ms=steps["full"],
        bare_step_ms=steps["bare"],
        loop_overhead=steps["full"] / steps["bare"],
        tokens_per_s=tokens_per_s,
        flops_per_token=flops_per_token,
        peak_tflops=peak / 1e12 if peak else None,
        peak_source="--peak_tflops" if peak_tflops
        else ("matmul probe" if trainer.device.type == "cpu" else "data sheet"),
        mfu=finite_or_none(flops_per_token * tokens_per_s / peak) if peak else None,
        loader_batches_per_s=_loader_speed(trainer),
        decode_new_tokens=sample_tokens,
        decode_weight_mb=decode.weight_bytes / 2**20,
        copy_gb_per_s=decode.copy_gb_per_s,
        decode_tokens_per_s=decode.tokens_per_s,
        decode_bandwidth_share=decode.bandwidth_share,
        decode_batch16_tokens_per_s=decode.batch_tokens_per_s,
        decode_batch16_bandwidth_share=decode.batch_bandwidth_share,
        decode_recompute_tokens_per_s=decode.recompute_tokens_per_s,
        kv_cache_speedup=decode.tokens_per_s / decode.recompute_tokens_per_s,
        peak_memory_mb=memory,
        peak_memory_kind=memory_kind,
        compile_seconds=compile_seconds,
        profile=_profile(trainer) if profile else None,
    )


def _full_step(trainer: Trainer, it: int) -> None:
    """One iteration of the training loop at a logged step, as `gptrain train` runs it."""
    lr, result = trainer.run_iteration(it, measure_update=trainer.update_ratio.due(it))
    trainer.report.step(it, lr, result, seconds_per_iter=1.0)


def nanogpt_step(trainer: Trainer, sampler) -> None:
    """nanoGPT's step: forward, backward and the next batch per micro-batch, clipping, AdamW, zero_grad."""
    for _ in range(trainer.accumulation_steps):
        batch = sampler.next_batch()
        with autocast(trainer.device, trainer.autocast_dtype):
            # (x, y), and positions for chat data; a batch of pairs for DPO, whose loss is the objective's
            loss = trainer.micro_batch_loss(batch)[0] if trainer.dpo else trainer.step_model(*batch)[1]
        trainer.scaler.scale(loss / trainer.accumulation_steps).backward()
    if trainer.config.grad_clip > 0:
        trainer.scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_(trainer.params, trainer.config.grad_clip)
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.optimizer.zero_grad(set_to_none=True)


def _time_steps(trainer: Trainer, timer: Callable[[Callable], float], iters: int) -> dict[str, float]:
    sampler = trainer.make_sampler("train", TRAIN_STREAM)  # a sampler of its own: the run's keeps its place
    for it in range(3):  # warm-up: thread pools, allocator, kernel selection
        _full_step(trainer, it)
        nanogpt_step(trainer, sampler)
    times = {"full": [], "bare": []}
    block = trainer.config.update_ratio_interval
    it = 3
    for round_ in range(max(2, iters // block)):
        def full(first=it):
            return [_full_step(trainer, first + i) for i in range(block)]

        def bare():
            return [nanogpt_step(trainer, sampler) for _ in range(block)]

        ways = [("full", full), ("bare", bare)]
        for kind, way in ways if round_ % 2 == 0 else ways[::-1]:
            times[kind].append(timer(way) / block)
        it += block
    return {kind: statistics.median(values) * 1000 for kind, values in times.items()}


def _loader_speed(trainer: Trainer, seconds: float = 0.5) -> float:
    sampler = trainer.make_sampler("train", 0)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler.next_batch()
        count += 1
    return count / (time.perf_counter() - start)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "peak RSS"


def _profile(trainer: Trainer, steps: int = 5) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for it in range(steps):
            _full_step(trainer, 100 + it)
    sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15)


def render(r: BenchResult) -> str:
    def row(name, value):
        return f"  {name:<34} {value}"

    mfu = f"{r.mfu * 100:.1f}% of {r.peak_tflops:.3g} TFLOP/s ({r.peak_source})" if r.mfu is not None else \
        "unknown peak: pass --peak_tflops"
    lines = [
        f"gptrain bench: {r.config['n_layer']}x{r.config['n_embd']} model, block {r.config['block_size']}, "
        f"batch {r.config['batch_size']} x {r.config['gradient_accumulation_steps']}",
        row("device", f"{r.device} ({r.threads} threads), {r.dtype}{', compiled' if r.compile else ''}"),
        row("torch", f"{r.torch_version}, Python {r.python}"),
        row("full training step", f"{r.full_step_ms:.2f} ms"),
        row("bare step (nanoGPT's)", f"{r.bare_step_ms:.2f} ms"),
        row("loop overhead (full / bare)", f"{r.loop_overhead:.3f}"),
        row("tokens/s", f"{r.tokens_per_s:,.0f} ({r.tokens_per_iter:,} tokens per step)"),
        row("model FLOPs per token", f"{r.flops_per_token / 1e6:.2f} M (6N + 12 L T C)"),
        row("MFU", mfu),
        row("data loader", f"{r.loader_batches_per_s:,.0f} batches/s"),
        row(f"decoding, batch 1 ({r.decode_new_tokens} tokens)",
            f"{r.decode_tokens_per_s:,.0f} tokens/s, {r.decode_bandwidth_share:.0%} of the bandwidth limit"),
        row("decoding, batch 16", f"{r.decode_batch16_tokens_per_s:,.0f} tokens/s, "
                                  f"{r.decode_batch16_bandwidth_share:.0%} of the bandwidth limit"),
        row("bandwidth limit, batch 1", f"{r.copy_gb_per_s * 1e9 / (r.decode_weight_mb * 2**20):,.0f} tokens/s "
                                        f"({r.decode_weight_mb:,.1f} MB of weights per step, "
                                        f"{r.copy_gb_per_s:.1f} GB/s copy)"),
        row("decoding, recompute (batch 1)", f"{r.decode_recompute_tokens_per_s:,.0f} tokens/s"),
        row("KV-cache speed-up", f"{r.kv_cache_speedup:.1f}x"),
        row("peak memory", f"{r.peak_memory_mb:,.0f} MB ({r.peak_memory_kind})"),
    ]
    if r.compile_seconds is not None:
        lines.append(row("first (compiling) step", f"{r.compile_seconds:.1f} s"))
    if r.profile:
        lines += ["", "top operators (torch.profiler, 5 full steps):", r.profile]
    return "\n".join(lines)


def to_json(r: BenchResult) -> str:
    """Strict JSON: a figure that came out infinite or NaN (say from an absurd --peak_tflops) is null."""
    figures = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in asdict(r).items()}
    return json.dumps(figures, indent=1, allow_nan=False)
