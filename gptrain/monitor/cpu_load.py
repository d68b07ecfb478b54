"""How busy the machine is with other work: the share of all CPUs' time that processes other than this one used
over an interval, from the kernel's counters (/proc/stat, so Linux only) less this process's own CPU time.

Other work on the CPUs slows a run for reasons no setting of the run can fix: PyTorch's OpenMP threads spin at
barriers waiting for a core another process holds. The CPU's peak probe and the logged steps record this share,
so that MFU and `gptrain diagnose` can tell a busy machine from a slow run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUSY_SHARE = 0.25  # others holding more than this share of the CPUs a run's threads need make timings unrepresentative
PROC_STAT = Path("/proc/stat")
# The shortest span a share is given for, in seconds of the whole machine's CPU time (wall time x CPUs): the
# counters move in clock ticks (10 ms of one CPU), so over a 3 ms step on 2 CPUs a share is 0 or 1 by rounding
# alone; over 0.5 s, a tick is 2%.
MIN_SPAN = 0.5
# Fields of /proc/stat's "cpu" line that count as busy: user nice system idle iowait irq softirq steal guest
# guest_nice, in that order. Idle and iowait are not busy; guest and guest_nice are already counted in user and
# nice; steal (a hypervisor running other machines on our CPUs) is other work that slows us like any other.
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
IDLE_FIELDS = (3, 4)


@dataclass(frozen=True)
class CpuReading:
    """Cumulative CPU seconds at one moment: all CPUs busy, all CPUs in all, and this process's own."""

    busy: float
    total: float
    own: float


def busy_share(before: CpuReading, after: CpuReading) -> float | None:
    """The share (0..1) of all CPUs' time between two readings that other processes used; None when the interval
    was too short for the kernel's counters to move. The machine's total comes from the same counters as its busy
    time, so both count the CPUs that are online, at the same clock tick."""
    total = after.total - before.total
    if total <= 0:
        return None
    others = (after.busy - before.busy) - (after.own - before.own)
    return min(max(others / total, 0.0), 1.0)  # both sides are sampled at clock ticks: a tick either way is noise


def held_from_threads(share: float, cpus: int, threads: int) -> float:
    """The share of the CPUs a process's `threads` need that other processes held, when those used `share` of all
    `cpus`: the scheduler gives the others the CPUs its threads leave idle first. With a thread per CPU (PyTorch's
    default) it is `share` itself; one thread beside one busy process on 2 CPUs is counted as losing nothing. It errs
    towards busy: a 1-thread matmul probe ran at 0.19 TFLOP/s idle and still 0.18 beside two busy processes, where
    2 threads fell from 0.39 to 0.01-0.14."""
    threads = max(min(threads, cpus), 1)
    return min(max(share * cpus - (cpus - threads), 0.0) / threads, 1.0)


def too_busy(share: float, cpus: int, threads: int) -> bool:
    """Whether others held more than BUSY_SHARE of the CPUs the threads need: then timings say more about them."""
    return held_from_threads(share, cpus, threads) > BUSY_SHARE


def parse_cpu_line(line: str, ticks_per_second: float) -> tuple[float, float]:
    """(busy, total) seconds from /proc/stat's first line, "cpu  u n s i w x y z g gn" in clock ticks."""
    fields = line.split()
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        raise ValueError(f"not /proc/stat's cpu line: {line!r}")
    ticks = [int(value) for value in fields[1:9]]
    busy = sum(ticks[i] for i in BUSY_FIELDS)
    return busy / ticks_per_second, (busy + sum(ticks[i] for i in IDLE_FIELDS)) / ticks_per_second


def read_cpu(path: Path = PROC_STAT) -> CpuReading | None:
    """The counters now: one small file read. None where there is no /proc/stat (not Linux) or it is unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            busy, total = parse_cpu_line(f.readline(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None
    own = os.times()
    return CpuReading(busy, total, own.user + own.system)


class CpuLoad:
    """The busy share since the previous figure it gave: one read of the counters per call."""

    def __init__(self, read: Callable[[], CpuReading | None] = read_cpu, min_span: float = MIN_SPAN):
        self.read, self.min_span = read, min_span
        self.last = read()

    def since_last(self) -> float | None:
        """None without /proc/stat, or while less than min_span of the machine's CPU time has passed since the last
        figure: the interval then runs on to a later call."""
        now = self.read()
        if now is None or self.last is None:
            self.last = now
            return None
        if now.total - self.last.total < self.min_span:
            return None
        share = busy_share(self.last, now)
        self.last = now
        return share
