import copy
import math

import pytest
import torch

from gptrain.train import Trainer


class Recorder:
    """Stands in for optimizer.step: keeps copies of the gradients the step would have applied."""

    def __init__(self, trainer: Trainer):
        self.grads = None
        trainer.optimizer.step = self.step
        self.params = trainer.params

    def step(self, *args, **kwargs):
        self.grads = [p.grad.detach().clone() for p in self.params]


def record_batches(trainer: Trainer) -> list:
    batches = []
    original = trainer.train_batches.next_batch

    def recording():
        batch = original()
        batches.append(batch)
        return batch

    trainer.train_batches.next_batch = recording
    return batches


def test_gradient_accumulation_equals_one_big_batch(tiny_config):
    trainer = Trainer(tiny_config(batch_size=2, gradient_accumulation_steps=4, grad_clip=0.0))
    reference = copy.deepcopy(trainer.model)
    batches = record_batches(trainer)
    recorder = Recorder(trainer)
    result = trainer.train_step()
    assert len(batches) == 4
    x = torch.cat([b[0] for b in batches])  # (8, T)
    y = torch.cat([b[1] for b in batches])
    _, loss = reference(x, y)
    loss.backward()
    for ours, (name, p) in zip(recorder.grads, reference.named_parameters()):
        torch.testing.assert_close(ours, p.grad, atol=1e-6, rtol=0, msg=name)
    assert result.loss.item() == pytest.approx(loss.item(), abs=1e-6)


def test_clipping_caps_the_global_norm_and_reports_the_norm_before(tiny_config):
    trainer = Trainer(tiny_config(grad_clip=0.05))
    reference = copy.deepcopy(trainer.model)
    batches = record_batches(trainer)
    recorder = Recorder(trainer)
    result = trainer.train_step()
    _, loss = reference(*batches[0])
    loss.backward()
    unclipped = torch.sqrt(sum(p.grad.pow(2).sum() for p in reference.parameters()))
    assert unclipped > 0.05  # the test is meaningless unless clipping had work to do
    assert result.grad_norm.item() == pytest.approx(unclipped.item(), rel=1e-5)
    clipped = torch.sqrt(sum(g.pow(2).sum() for g in recorder.grads))
    assert clipped.item() == pytest.approx(0.05, rel=1e-4)


def test_grad_norm_is_reported_without_clipping_and_update_ratio_when_measured(tiny_config):
    trainer = Trainer(tiny_config(grad_clip=0.0))
    unmeasured = trainer.train_step()
    assert unmeasured.grad_norm.item() > 0 and unmeasured.update_ratio is None
    before = [p.detach().clone() for p in trainer.params]
    measured = trainer.train_step(measure_update=True)
    delta = torch.sqrt(sum((p - b).pow(2).sum() for p, b in zip(trainer.params, before)))
    weights = torch.sqrt(sum(b.pow(2).sum() for b in before))
    assert measured.update_ratio.item() == pytest.approx((delta / weights).item(), rel=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_steps_train_on_cpu(tiny_config, dtype):
    trainer = Trainer(tiny_config(dtype=dtype))
    assert trainer.scaler.is_enabled() == (dtype == "float16")
    before = [p.detach().clone() for p in trainer.params]
    losses = []
    for it in range(15):
        trainer.set_lr(it)
        losses.append(trainer.train_step().loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))
    if dtype == "float16":
        assert trainer.checkpoint_state()["scaler"]["scale"] > 0


def test_evaluation_uses_the_same_batches_every_time(tiny_config):
    trainer = Trainer(tiny_config())
    first = trainer.evaluator.estimate_loss()
    assert first == trainer.evaluator.estimate_loss()
    assert first["train"] == pytest.approx(math.log(trainer.dataset.meta["vocab_size"]), rel=0.1)
    assert trainer.model.training
