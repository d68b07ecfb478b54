"""`batch_size: auto`: the largest micro-batch that fits the device's memory, found by trying real steps.

The candidates are the divisors of the sequences each rank takes per optimizer step (global_batch_size over the
world size), so the micro-batch found and a whole number of micro-batches always make up exactly the configured
step: the tokens per step are kept, only how they are split changes. (A global batch with few divisors leaves few
candidates: 480 has 24, 479 only 1 and 479.) The smallest candidate, 1, is tried first, which also allocates the
optimizer's state, then the list is bisected: memory grows with the micro-batch, so the search ends on two
neighbours, the largest candidate that fitted and the next one up, which ran out of memory (or none is above it).
A candidate fits when one whole step (forward, backward, optimizer) runs at it: running out of memory is caught
(CUDA's torch.OutOfMemoryError, the CPU allocator's "can't allocate memory"), the memory the trial held is freed,
and the search goes on below it. Lightning's BatchSizeFinder works alike (it doubles first, then bisects).

Headroom: the trials run with 10% of the memory held back, for what a run needs beyond a trial step (the caching
allocator's fragmentation over many steps, evaluations, a checkpoint's copies, the threads the run starts). On a
GPU that is the per-process memory fraction (90% of the one set, 1 by default), restored afterwards. A CPU's
memory runs out differently: Linux lets a process reserve more than there is, then swaps or kills it, so the
trials run under an address-space limit (RLIMIT_AS) of the memory available now, or of the room a limit already
set leaves, whichever is less, less the headroom, and shared by the ranks on this machine; a step too large then
fails to allocate instead. The previous limit is restored afterwards. Address space counts reservations too (each
thread's malloc arena reserves 64 MiB), so on a CPU the search errs on the small side.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptrain.errors import UserError
from gptrain.runtime.device import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory

HEADROOM = 0.10  # the share of the device's memory the trials leave unused


def micro_batch_candidates(global_batch_size: int, world_size: int) -> list[int]:
    """The micro-batches that split global_batch_size exactly over world_size ranks: the divisors of each rank's
    share, smallest first."""
    if global_batch_size % world_size:
        raise UserError(f"global_batch_size ({global_batch_size}) must be divisible by the number of processes "
                        f"({world_size}): each rank takes an equal share of every step; use a multiple of {world_size}")
    share = global_batch_size // world_size
    return [b for b in range(1, share + 1) if share % b == 0]


@dataclass
class Search:
    """The outcome of a search on one process: the micro-batch chosen (0 when not even the smallest fitted) and
    every trial, in the order tried."""

    chosen: int
    trials: list[tuple[int, bool]] = field(default_factory=list)  # (micro-batch, fitted)

    @property
    def failed_above(self) -> int | None:
        """The smallest candidate above the chosen one that was tried and ran out of memory."""
        failed = [b for b, fitted in self.trials if not fitted and b > self.chosen]
        return min(failed) if failed else None

    def describe(self) -> str:
        return ", ".join(f"{b} {'fits' if fitted else 'out of memory'}" for b, fitted in self.trials)


def is_out_of_memory(exc: BaseException) -> bool:
    """What runtime.device.out_of_memory_as_user_error counts as running out of memory."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc)
                                              or "out of memory" in str(exc).lower())


def fits(step: Callable[[int], None], batch: int, device: torch.device, cleanup: Callable[[], None]) -> bool:
    """Run one trial step at `batch`; False when it ran out of memory. The memory the trial held is freed either
    way (the exception's frames hold the activations until it is dropped, so that happens outside `except`)."""
    ok = True
    try:
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        ok = False
    cleanup()
    gc.collect()
    empty_cache(device)
    return ok


def find_micro_batch(candidates: list[int], step: Callable[[int], None], device: torch.device,
                     cleanup: Callable[[], None], ranks_here: int = 1) -> Search:
    """The largest candidate at which `step` runs without running out of memory, found under the headroom:
    the smallest first, then bisection. chosen is 0 when not even the smallest fits (the caller reports it, after
    the ranks agreed, so that no rank waits for one that stopped)."""
    search = Search(0)
    with memory_headroom(device, ranks_here):
        def trial(index: int) -> bool:
            ok = fits(step, candidates[index], device, cleanup)
            search.trials.append((candidates[index], ok))
            return ok

        if not trial(0):
            return search
        low, high = 0, len(candidates)  # candidates[low] fitted; candidates[high] did not (or is past the end)
        while high - low > 1:
            middle = (low + high) // 2
            if trial(middle):
                low = middle
            else:
                high = middle
        search.chosen = candidates[low]
    return search


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


@contextlib.contextmanager
def memory_headroom(device: torch.device, ranks_here: int = 1):
    """While the trials run: on CUDA, the process may use 90% of the GPU's memory (of the share a memory fraction
    already set allows); on a Linux CPU, its address space may grow by 90% of the memory available now (shared
    among this machine's ranks) or of the room a limit already set leaves, whichever is less."""
    if device.type == "cuda":
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        before = getter(device) if getter else 1.0
        torch.cuda.set_per_process_memory_fraction(before * (1.0 - HEADROOM), device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(before, device)
        return
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        yield
        return
    import resource  # POSIX only

    with returning_freed_memory():
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        used = address_space_bytes()
        available = available_memory_bytes()
        rooms = [] if available is None else [available // max(1, ranks_here)]
        if soft != resource.RLIM_INFINITY:  # a limit already set (ulimit -v) bounds the run too
            rooms.append(max(0, soft - used))
        if not rooms:
            yield
            return
        resource.setrlimit(resource.RLIMIT_AS, (used + int(min(rooms) * (1.0 - HEADROOM)), hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def returning_freed_memory():
    """A CPU run keeps the memory it frees (device.keep_freed_memory): in the address space, where the limit counts
    it, but free to reuse, so that an address-space limit would see room that is not there and not see room that
    is. During the trials glibc takes every block of 64 KiB or more from the OS and gives it back when freed, and
    the free top of the heap is given back first, so the address space is the memory in use; afterwards a run's
    settings return. (Linux with glibc; elsewhere nothing changes.)"""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        yield
    finally:
        keep_freed_memory()


def address_space_bytes() -> int:
    """This process's virtual memory size (what RLIMIT_AS limits)."""
    pages = int(Path("/proc/self/statm").read_text().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


def available_memory_bytes() -> int | None:
    """Memory that can be allocated without swapping: the kernel's MemAvailable, or less where a cgroup (a
    container's memory limit) allows less. None where it cannot be told."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = next(int(line.split()[1]) * 1024 for line in meminfo.splitlines()
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
            if limit.isdigit() and usage.isdigit():
                available = min(available, max(0, int(limit) - int(usage)))
                break
        except OSError:
            continue
    return available
