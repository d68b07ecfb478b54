"""The health monitor, provoked with tiny real runs."""

import math

import pytest
import torch
from conftest import events, metrics_rows

from gptrain.cli import run_guarded
from gptrain.errors import TrainingHalted
from gptrain.train import Trainer, train


def test_logged_steps_carry_every_metric(tiny_config, tmp_path):
    train(tiny_config(max_iters=12, eval_interval=6, grad_clip=0.5, update_ratio_interval=5))
    steps = [r for r in metrics_rows(tmp_path / "run") if "loss" in r]
    assert [s["iter"] for s in steps] == list(range(12))
    for s in steps:
        assert set(s) >= {"iter", "loss", "lr", "grad_norm", "clipped", "ms", "tokens_per_s", "mfu"}
        assert s["clipped"] == (s["grad_norm"] > 0.5)
        assert s["tokens_per_s"] > 0 and 0 < s["mfu"] < 1
    # The update ratio copies every weight: measured every update_ratio_interval iterations only.
    assert [s["iter"] for s in steps if "update_ratio" in s] == [0, 5, 10]
    assert all(0 < s["update_ratio"] < 1 for s in steps if "update_ratio" in s)
    evals = [r for r in metrics_rows(tmp_path / "run") if "val_loss" in r]
    assert [e["iter"] for e in evals] == [0, 6, 12] and all("train_loss" in e for e in evals)


def test_sparse_logging_measures_the_ratio_at_the_first_logged_step_of_each_interval(tiny_config, tmp_path):
    train(tiny_config(max_iters=40, eval_interval=100, log_interval=7, update_ratio_interval=10))
    steps = [r for r in metrics_rows(tmp_path / "run") if "loss" in r]
    assert [s["iter"] for s in steps] == [0, 7, 14, 21, 28, 35, 39]
    assert [s["iter"] for s in steps if "update_ratio" in s] == [0, 14, 21, 35]


def poison_from(trainer: Trainer, first_bad_iter: int) -> dict:
    """Make every training forward pass from first_bad_iter on produce NaN, as an overflow would."""
    seen = {}

    def hook(module, inputs, output):
        if module.training and trainer.loop.iter_num >= first_bad_iter:
            seen.setdefault("weights", [p.detach().clone() for p in trainer.params])
            return output * math.nan
        return None

    trainer.model.transformer.wte.register_forward_hook(hook)
    return seen


def test_nonfinite_steps_are_skipped_then_training_stops(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(max_iters=40, eval_interval=10, max_bad_steps=3, always_save_checkpoint=True))
    seen = poison_from(trainer, 12)
    with pytest.raises(TrainingHalted) as info:
        trainer.run()
    message = str(info.value)
    assert "3 consecutive steps" in message and "from iter 12" in message
    assert "learning_rate" in message and "grad_clip" in message  # names the fix
    # The weights are exactly those before the first bad step: every bad update was skipped.
    for before, after in zip(seen["weights"], trainer.params):
        assert torch.equal(before, after)
    # The last good checkpoint (iter 10) is intact and no checkpoint with NaN weights was written.
    state = torch.load(tmp_path / "run" / "ckpt_last.pt", weights_only=True)
    assert state["progress"]["iter_num"] == 10
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    [event] = events(tmp_path / "run", "nonfinite")  # logged once, not once per bad step
    assert event["iter"] == 12 and "in iters 12..12" in event["message"]
    assert "transformer.h.0.attn.c_attn.weight" in event["message"]


def test_training_halted_exits_with_code_3(capsys):
    def halt(argv):
        raise TrainingHalted("training stopped at iter 5: lower learning_rate")

    assert run_guarded(halt) == 3
    assert "lower learning_rate" in capsys.readouterr().err


def test_float16_overflow_skips_are_counted(tiny_config):
    trainer = Trainer(tiny_config(dtype="float16"))
    # A scale so large that the scaled gradients overflow, until the scaler brings it down.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    before = [p.detach().clone() for p in trainer.params]
    trainer.train_step()
    assert trainer.health.bad_count.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))  # the scaler skipped the update
    assert trainer.scaler.get_scale() < 2.0**60


def test_gradient_spike_is_reported(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(max_iters=30))
    model = trainer.model

    def spiking(*batch, **options):
        logits, loss = model(*batch, **options)
        return logits, loss * (100.0 if trainer.loop.iter_num == 25 else 1.0)

    trainer.step_model = spiking
    trainer.run()
    [spike] = events(tmp_path / "run", "grad_spike")
    assert spike["iter"] == 25 and "running median" in spike["message"]


def test_update_ratio_out_of_band_is_reported_at_most_once_per_eval_interval(tiny_config, tmp_path):
    train(tiny_config(learning_rate=1e-7, min_lr=1e-8, max_iters=60, eval_interval=20, update_ratio_interval=1))
    warnings = events(tmp_path / "run", "update_ratio")
    assert warnings and "below 0.0001" in warnings[0]["message"]
    windows = [w["iter"] // 20 for w in warnings]
    assert len(windows) == len(set(windows))  # never two in one eval interval


def test_overfitting_is_reported(overfit_run):
    warnings = events(overfit_run, "overfitting")
    assert warnings and "the best val loss was" in warnings[0]["message"]
    assert len({w["iter"] for w in warnings}) == len(warnings)
