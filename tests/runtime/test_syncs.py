"""No host-device synchronisation in the hot loop: a step that is not logged never reads a tensor on the host,
with AdamW or Muon, when the device decides (as on CUDA). Counted on a CPU by patching the methods that read a
tensor's value, which are what forces a CUDA synchronisation."""

import collections
import contextlib

import pytest
import torch
from conftest import step_with_a_nan_gradient

from gptrain.train import Trainer

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy", "nonzero")


@contextlib.contextmanager
def counting_reads():
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name, method):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)
        return read

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("accumulation", [1, 3])
def test_unlogged_steps_never_read_the_device(tiny_config, optimizer, accumulation):
    trainer = Trainer(tiny_config(optimizer=optimizer, gradient_accumulation_steps=accumulation))
    trainer.host_decides = False  # what a GPU does: skips and clipping decided on the device
    trainer.train_step()  # first step: optimizer state is created
    with counting_reads() as reads:
        for _ in range(5):
            trainer.train_step()
    assert sum(reads.values()) == 0, dict(reads)


def test_the_loop_reads_only_at_logged_steps(tiny_config, monkeypatch):
    from gptrain.monitor.health import HealthMonitor

    read_at = []
    original = HealthMonitor.read_bad_steps
    monkeypatch.setattr(HealthMonitor, "read_bad_steps", lambda self, it: read_at.append(it) or original(self, it))
    from gptrain.train import train

    train(tiny_config(max_iters=25, log_interval=10, max_bad_steps=3, eval_interval=100))
    assert read_at == [0, 10, 20, 24]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_non_finite_step_is_skipped_on_the_device(tiny_config, optimizer):
    """The device-side skip (found_inf) leaves weights and optimizer state exactly as they were."""
    trainer = Trainer(tiny_config(optimizer=optimizer))
    trainer.host_decides = False
    trainer.train_step()
    weights = [p.detach().clone() for p in trainer.params]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in enumerate(trainer.optimizer.state.values())}
    step_with_a_nan_gradient(trainer)
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.params))
    for k, s in enumerate(trainer.optimizer.state.values()):
        assert all(torch.equal(v, state[k][n]) for n, v in s.items()), k


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_device_and_host_decisions_agree(tiny_config, optimizer):
    """The same steps, decided on the device or on the host, give the same weights."""
    runs = []
    for host_decides in (True, False):
        trainer = Trainer(tiny_config(optimizer=optimizer, grad_clip=0.05))  # clipping active every step
        trainer.host_decides = host_decides
        for _ in range(4):
            trainer.train_step()
        runs.append([p.detach().clone() for p in trainer.params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
