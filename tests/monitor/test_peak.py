"""A CPU's peak probe waits for a quiet moment, and the run says when it found none: injected probes and loads."""

import pytest
import torch

from gptrain.monitor.cpu_load import CpuReading
from gptrain.monitor.flops import Peak, probe_when_quiet
from gptrain.monitor.run_info import RunInfo


def probes(*rates):
    queue = list(rates)
    return lambda: queue.pop(0)


def machine(*shares):
    """read() before and after each probe: 2 CPUs for 1 s a probe, this process using one, others `share` of both."""
    readings, busy = [], 0.0
    for n, share in enumerate(shares):
        readings.append(CpuReading(busy, total=2.0 * n, own=float(n)))
        busy += 1.0 + 2.0 * share
        readings.append(CpuReading(busy, total=2.0 * (n + 1), own=float(n + 1)))
    return lambda: readings.pop(0)


def test_a_quiet_machine_is_probed_once():
    pauses = []
    peak = probe_when_quiet(probes(4e11), machine(0.1), cpus=2, threads=2, sleep=pauses.append)
    assert peak == Peak(4e11, pytest.approx(0.1)) and pauses == []


def test_the_probe_runs_again_while_others_keep_the_cpus_busy():
    pauses = []
    peak = probe_when_quiet(probes(1e10, 3e11, 4e11), machine(0.9, 0.5, 0.0), cpus=2, threads=2, pause=0.2,
                            sleep=pauses.append)
    assert peak.flops == 4e11 and peak.busy == pytest.approx(0.0)
    assert pauses == [0.2, 0.2]


def test_no_quiet_moment_keeps_the_best_rate_and_says_how_busy_it_was():
    peak = probe_when_quiet(probes(1e10, 2e11, 5e10, 1e11), machine(0.9, 0.6, 0.8, 0.7), cpus=2, threads=2,
                            attempts=4, sleep=lambda s: None)
    assert peak.flops == 2e11 and peak.busy == pytest.approx(0.6)  # the quietest attempt's share


def test_without_proc_stat_one_probe_as_before():
    peak = probe_when_quiet(probes(3e11, 9e11), lambda: None, cpus=2, threads=2, sleep=lambda s: None)
    assert peak == Peak(3e11, None)


def test_one_thread_beside_one_busy_process_on_two_cpus_is_probed_once():
    """The other process has a CPU of its own: it does not hold up the probe's thread (measured, flops.py)."""
    peak = probe_when_quiet(probes(1.8e11, 9e11), machine(0.5), cpus=2, threads=1, sleep=lambda s: None)
    assert peak == Peak(1.8e11, pytest.approx(0.5))
    assert "MFU may read high" not in info(peak_busy=0.5, threads=1).summary()


def info(**changes) -> RunInfo:
    fields = dict(n_params=30_000, n_params_non_embedding=29_000, n_trainable=30_000, lora=False, vocab_size=65,
                  flops_per_token=200_000, peak_flops=4e11, peak_busy=0.05, threads=2, cpus=2,
                  device=torch.device("cpu"), dtype=torch.float32, compiled=False, tokens_per_iter=256, world_size=1,
                  parallel="ddp", pairs_per_iter=None)
    return RunInfo(**{**fields, **changes})


def test_the_start_line_says_when_the_probe_found_no_quiet_moment():
    assert "MFU may read high" not in info().summary()
    busy = info(peak_flops=1e11, peak_busy=0.62)
    assert "peak 0.1 TFLOP/s, probed while other processes used 62% of the 2 CPUs (no quiet moment for its 2 " \
           "threads), so MFU may read high" in busy.summary()
    assert busy.start_row(0)["peak_busy"] == 0.62 and info(peak_busy=None).start_row(0)["peak_busy"] is None


def test_the_start_line_names_the_trained_parameters_only_when_fewer():
    assert "trained" not in info().summary()
    lora = info(n_trainable=1536, lora=True)
    assert "0.03M parameters (0.03M without position embeddings), 1,536 trained (LoRA);" in lora.summary()
    assert lora.start_row(0)["n_trainable"] == 1536
