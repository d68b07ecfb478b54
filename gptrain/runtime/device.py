"""Where and in what precision a run computes: device, autocast dtype, gradient scaling, memory checks."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
from functools import cache
from pathlib import Path

import torch

from gptrain.errors import UserError, one_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def resolve_device(name: str) -> torch.device:
    """auto picks CUDA, then Apple's MPS, then the CPU."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps; got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available here; use device: cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' asked for, but MPS is not available here; use device: cpu or auto")
    return device


@cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX), where bf16 matmuls
    run faster than float32; elsewhere CPU bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 where the device computes it natively, else float16 on CUDA, else float32."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        # Without including_emulation=False, a V100 or T4 says yes and then runs bf16 at a fraction of fp16's speed.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_compile(setting: str | bool, device: torch.device) -> bool:
    """auto compiles on CUDA, where fusing kernels pays, and not on CPUs or MPS, where the CPU recipe measured
    no faster once its compile time is counted (docs/measurements.md has the figures)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compiles_per_block(device: torch.device, fsdp: bool) -> bool:
    """What torch.compile wraps: each transformer block, or the whole model. Under FSDP2, each block before it is
    sharded (torchtitan's way: FSDP2's hooks stay outside the compiled graphs). On a CPU, each block too: the
    blocks share one compiled graph, so compiling takes a fraction of the whole model's time, which is a large
    share of a short CPU run (figures in docs/measurements.md); the embedding, head and loss run eagerly.
    Otherwise (a GPU) the whole model, nanoGPT's way, which also fuses the head's loss over the vocabulary."""
    return fsdp or device.type == "cpu"


def configure_backends(device: torch.device) -> None:
    """On CUDA, float32 matmuls may use TF32 tensor cores (10-bit mantissa inputs, float32 accumulation): several
    times faster on Ampere and later, and what nanoGPT does. CPUs have no TF32, and their float32 stays exact.
    On a CPU, freed memory stays in the process for the next step (keep_freed_memory)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if device.type == "cpu":
        keep_freed_memory()


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit systems.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> None:
    """glibc hands blocks above its mmap threshold back to the OS when they are freed, and trims the top of its
    heap, so a training step that frees its activations page-faults fresh zeroed pages back in at the next step:
    the fast CPU recipe took ~2,800-5,600 page faults and 8-16 ms of kernel time a step, and ran 5% slower than
    with these settings (docs/measurements.md). Large blocks now come from the heap and stay there, as they do
    with jemalloc or tcmalloc, which PyTorch's CPU tuning guide recommends. Linux with glibc only: elsewhere this
    does nothing (musl's mallopt does nothing either)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None)  # the symbols already loaded into this process, the C library's among them
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def cache_graphs_with_autocast() -> None:
    """For a run that compiles (importing inductor costs a second, so only then). AOTAutograd bypasses its cache
    for any graph that enters autocast (pytorch/pytorch#191106, fixed upstream by #192555, not in torch 2.13), so
    every process traced and partitioned the blocks' forward and backward again: 1.1-1.4 s of the CPU fast
    recipe's first step, which takes 0.4 s with the cache. Entering autocast is determined by its arguments,
    which are constants in the graph and part of the cache key, so caching it is safe (the reasoning of the
    upstream fix); inductor's own allow-list for such functions marks it so."""
    import torch._inductor.config as inductor_config

    for name in ("_enter_autocast", "_exit_autocast"):
        inductor_config.unsafe_marked_cacheable_functions[f"torch.amp.autocast_mode.{name}"] = torch.__version__


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """float16 gradients underflow without loss scaling; bfloat16 and float32 have float32's range."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the device the run computes on (RAM for a CPU); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


@contextlib.contextmanager
def out_of_memory_as_user_error():
    """Running out of memory mid-run is one error line with what to lower, not a traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise UserError(_out_of_memory(exc)) from None
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc).lower():
            raise
        raise UserError(_out_of_memory(exc)) from None


def _out_of_memory(exc: BaseException) -> str:
    return (f"out of memory ({one_line(exc, 120)}); lower batch_size or block_size (keep the tokens per step with "
            "gradient_accumulation_steps), or train a smaller model; checkpoints already written are intact")
