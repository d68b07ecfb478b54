"""How busy the machine is, from /proc/stat and this process's CPU time: the arithmetic on injected readings."""

import pytest

from gptrain.monitor.cpu_load import (
    CpuLoad,
    CpuReading,
    busy_share,
    held_from_threads,
    parse_cpu_line,
    read_cpu,
    too_busy,
)

# user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks
CPU_LINE = "cpu  1000 50 200 5000 100 10 20 30 400 0\n"


def test_the_cpu_line_splits_into_busy_and_total_seconds():
    busy, total = parse_cpu_line(CPU_LINE, ticks_per_second=100)
    assert busy == pytest.approx((1000 + 50 + 200 + 10 + 20 + 30) / 100)  # guest is inside user already
    assert total == pytest.approx(busy + (5000 + 100) / 100)  # idle and iowait are not busy


@pytest.mark.parametrize("line", ["", "intr 1 2 3", "cpu0 1 2 3 4 5 6 7 8", "cpu 1 2 3"])
def test_a_line_that_is_not_the_cpu_total_is_refused(line):
    with pytest.raises(ValueError):
        parse_cpu_line(line, 100)


def test_the_share_is_the_busy_time_others_used_over_all_cpus_time():
    before = CpuReading(busy=100.0, total=400.0, own=10.0)
    # 2 CPUs for 1 second: 2 s in all, 1.5 s busy, 0.5 s of it ours, so others used 1 s: half the machine.
    assert busy_share(before, CpuReading(busy=101.5, total=402.0, own=10.5)) == pytest.approx(0.5)
    # Only this process worked: the machine is quiet, whatever this process does.
    assert busy_share(before, CpuReading(busy=102.0, total=402.0, own=12.0)) == 0.0


def test_tick_noise_stays_within_0_and_1():
    before = CpuReading(busy=100.0, total=400.0, own=10.0)
    assert busy_share(before, CpuReading(busy=101.0, total=402.0, own=11.02)) == 0.0  # own counted a tick more
    assert busy_share(before, CpuReading(busy=102.1, total=402.0, own=10.0)) == 1.0


def test_no_share_when_the_counters_did_not_move():
    reading = CpuReading(busy=100.0, total=400.0, own=10.0)
    assert busy_share(reading, reading) is None


def test_others_fill_the_cpus_the_threads_leave_idle_first():
    assert held_from_threads(0.6, cpus=2, threads=2) == pytest.approx(0.6)  # a thread per CPU: the share itself
    assert held_from_threads(0.5, cpus=2, threads=1) == 0.0  # one busy process, one CPU left for the one thread
    assert held_from_threads(0.75, cpus=2, threads=1) == pytest.approx(0.5)
    assert held_from_threads(0.5, cpus=8, threads=16) == pytest.approx(0.5)  # more threads than CPUs: all of them
    assert too_busy(0.3, cpus=4, threads=4) and not too_busy(0.3, cpus=4, threads=2)


def test_read_cpu_reads_the_first_line(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(CPU_LINE + "cpu0 1 2 3 4 5 6 7 8 9 10\nintr 12345\n")
    reading = read_cpu(stat)
    assert reading.busy > 0 and reading.total > reading.busy and reading.own > 0
    assert read_cpu(tmp_path / "missing") is None  # not Linux: no figure, and no error
    stat.write_text("garbage\n")
    assert read_cpu(stat) is None


def readings(*values):
    """A read() that returns the given readings, one per call (None: no /proc/stat)."""
    queue = list(values)
    return lambda: queue.pop(0)


def test_load_since_the_last_figure():
    load = CpuLoad(readings(CpuReading(0.0, 0.0, 0.0), CpuReading(1.0, 2.0, 0.5), CpuReading(1.1, 2.2, 0.6),
                            CpuReading(3.0, 4.0, 0.5)), min_span=1.0)
    assert load.since_last() == pytest.approx(0.25)
    assert load.since_last() is None  # 0.2 s of the machine's time: too short for the counters' ticks
    assert load.since_last() == pytest.approx(1.0)  # measured from the last figure, over the short span too


def test_no_load_figure_without_proc_stat():
    load = CpuLoad(readings(None, None))
    assert load.since_last() is None
