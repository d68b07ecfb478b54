"""Model FLOPs and hardware peaks, for model FLOPs utilisation (MFU).

FLOPs per token follow the PaLM paper (Chowdhery et al. 2022, appendix B): 6N for the matmuls of the forward
and backward pass over N parameters, plus 12 * L * T * C for attention's score and value products.
N counts every weight a token is multiplied by: all parameters except the position table and, in an untied
model, the input embedding (a lookup, not a matmul); a tied embedding counts once, as the LM head's matrix
(nanoGPT's estimate_mfu counts the same). A padded vocabulary counts in full, as the device computes it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from gptrain.monitor.cpu_load import CpuReading, busy_share, read_cpu, too_busy

# Dense (no sparsity) peak TFLOP/s per dtype, from the vendors' data sheets. "float32" is what a float32 matmul
# runs at under torch.set_float32_matmul_precision("high"), which gptrain sets on CUDA: TF32 tensor cores on
# Ampere and later, plain FP32 before them (V100, T4). Patterns are regular expressions searched in
# torch.cuda.get_device_name(), first match wins: NVL before SXM, and word ends so L4 is not read in L40.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H200 NVL", {"bfloat16": 836.0, "float16": 836.0, "float32": 417.5}),
    (r"H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    (r"H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 417.5}),
    (r"H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    (r"H100", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    (r"A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    (r"L40S", {"bfloat16": 362.1, "float16": 362.1, "float32": 183.0}),
    (r"L40\b", {"bfloat16": 181.0, "float16": 181.0, "float32": 90.5}),
    (r"L4\b", {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0}),
    (r"A10G", {"bfloat16": 70.0, "float16": 70.0, "float32": 35.0}),
    (r"A10\b", {"bfloat16": 125.0, "float16": 125.0, "float32": 62.5}),
    (r"RTX 4090", {"bfloat16": 165.2, "float16": 165.2, "float32": 82.6}),
    (r"RTX 3090", {"bfloat16": 71.0, "float16": 71.0, "float32": 35.6}),
    (r"V100", {"float16": 125.0, "float32": 15.7}),
    (r"T4\b", {"float16": 65.0, "float32": 8.1}),
]


def flops_per_token(n_params_non_embedding: int, n_layer: int, block_size: int, attention_width: int) -> int:
    """Training FLOPs (forward + backward) per token at context length block_size; attention_width is the queries'
    width, n_head x head size (n_embd for GPT-2)."""
    return 6 * n_params_non_embedding + 12 * n_layer * block_size * attention_width


def model_flops_per_token(model, block_size: int | None = None) -> int:
    c = model.config
    return flops_per_token(model.matmul_params(), c.n_layer, block_size or c.block_size, c.n_head * c.head_size)


def gpu_peak_flops(device_name: str, dtype: str) -> float | None:
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks[dtype] * 1e12 if dtype in peaks else None
    return None


@dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s in a dtype, and for a CPU's probe how busy the machine was while it ran."""

    flops: float | None  # None where unknown
    busy: float | None = None  # the share of the machine other processes used in the quietest probe; None: unmeasured


PROBE_ATTEMPTS = 4  # the most probes a CPU's peak takes while other processes keep the machine busy
PROBE_PAUSE = 0.2  # seconds between two probes, for a burst of other work to pass


@cache
def cpu_peak(dtype: str, wait_for_quiet: bool = True) -> Peak:
    """Measured peak: the best rate of a square matmul in `dtype` on all threads. Other work on the CPUs makes the
    probe read far too low (2 cores: 0.39 TFLOP/s idle, 0.01-0.14 beside two busy processes, as OpenMP threads
    spin at barriers), and MFU then far too high; so the probe runs again while others hold the CPUs its threads
    need. Without wait_for_quiet (torchrun's ranks, which probe side by side as they then train): one probe, load
    not measured."""
    read = read_cpu if wait_for_quiet else lambda: None
    return probe_when_quiet(matmul_probe(dtype), read, os.cpu_count() or 1, torch.get_num_threads())


def matmul_probe(dtype: str, size: int = 1024, seconds: float = 0.25) -> Callable[[], float]:
    """A probe whose every call gives the best FLOP/s of a square matmul in `dtype` over about `seconds`."""
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG, and so training, untouched
    a = torch.randn(size, size, generator=generator).to(torch_dtype)
    b = torch.randn(size, size, generator=generator).to(torch_dtype)
    torch.mm(a, b)  # warm-up: thread pool and kernel selection

    def best_rate() -> float:
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best

    return best_rate


def probe_when_quiet(probe: Callable[[], float], read: Callable[[], CpuReading | None], cpus: int, threads: int,
                     attempts: int = PROBE_ATTEMPTS, pause: float = PROBE_PAUSE, sleep=time.sleep) -> Peak:
    """Probe until a probe ran on a quiet machine (others did not hold the CPUs its `threads` need, as read()
    before and after it tells), pausing between probes, at most `attempts` times. The best rate is the peak; the
    quietest probe's share of the machine says whether a quiet moment was found. One probe where read() has no
    figure."""
    rates, shares = [], []
    for attempt in range(attempts):
        if attempt:
            sleep(pause)
        before = read()
        rates.append(probe())
        after = read()
        share = busy_share(before, after) if before and after else None
        if share is None:
            break
        shares.append(share)
        if not too_busy(share, cpus, threads):
            break
    return Peak(max(rates), min(shares, default=None))


def device_peak(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None,
                wait_for_quiet: bool = True) -> Peak:
    """The device's peak in the run's dtype: a data-sheet figure on GPUs, a measured one on CPUs."""
    if override_tflops:
        return Peak(override_tflops * 1e12)
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        return Peak(gpu_peak_flops(torch.cuda.get_device_name(device), name))
    if device.type == "cpu" and name in cpu_native_dtypes():
        return cpu_peak(name, wait_for_quiet)
    return Peak(None)  # e.g. float16 on a CPU: emulated, so no peak the model could be measured against


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None) -> float | None:
    """The peak's FLOP/s alone (bench's figure)."""
    return device_peak(device, dtype, override_tflops).flops


def cpu_native_dtypes() -> tuple[str, ...]:
    """The dtypes a CPU multiplies natively, whose probed rate is a meaningful peak."""
    from gptrain.runtime.device import cpu_has_native_bf16

    return ("float32", "bfloat16") if cpu_has_native_bf16() else ("float32",)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_model_name()
    return device.type


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
