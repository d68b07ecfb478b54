"""early_stop_evals: the run stops when val loss has not improved for K evaluations, ckpt_best.pt holds the best
model, metrics.jsonl, the console and `gptrain diagnose` say so, and a resume decides sensibly."""

import pytest
from conftest import TINY, events, metrics_rows, prepare_text

from gptrain import checkpoint as ckpt_io
from gptrain.analysis.diagnose import diagnose
from gptrain.config import build_config
from gptrain.errors import UserError
from gptrain.evaluate import Evaluator
from gptrain.train import Trainer, train

# Evaluations every 5 iterations. Val improves up to iter 10 (2.5), then not at 15 and 20: K=2 stops at 20.
VAL_LOSSES = [4.0, 3.0, 2.5, 2.6, 2.55, 2.4, 2.3, 2.2, 2.1]


@pytest.fixture
def scripted_val(monkeypatch):
    """The evaluations return these val losses, in order (the rest of the run is real)."""
    pending = []

    def estimate_loss(self):
        loss = pending.pop(0)
        return {"train": loss, "val": loss}

    monkeypatch.setattr(Evaluator, "estimate_loss", estimate_loss)
    return pending


def early_config(tiny_config, **overrides):
    return tiny_config(**{"max_iters": 40, "lr_decay_iters": 40, "eval_interval": 5, "early_stop_evals": 2,
                          **overrides})


def saved_iter(run_dir, name):
    return ckpt_io.load_checkpoint(run_dir / name)["progress"]["iter_num"]


@pytest.mark.parametrize("always_save", [True, False])
def test_the_run_stops_keeping_the_best_model_and_says_why(tiny_config, tmp_path, scripted_val, capsys, always_save):
    scripted_val.extend(VAL_LOSSES)
    trainer = train(early_config(tiny_config, always_save_checkpoint=always_save))
    run = tmp_path / "run"
    assert trainer.loop.iter_num == 20 and trainer.loop.best_iter == 10
    assert saved_iter(run, ckpt_io.CKPT_BEST) == 10 and saved_iter(run, ckpt_io.CKPT_LAST) == 20
    (stop,) = events(run, "early_stop")
    assert stop["iter"] == 20 and stop["best_val_loss"] == 2.5 and stop["best_iter"] == 10
    assert stop["evals_without_improvement"] == 2
    assert "val loss has not improved for 2 evaluations in a row (early_stop_evals: 2)" in stop["message"]
    out = capsys.readouterr().out
    assert f"early stop at iter 20: {stop['message']}" in out and f"{run / ckpt_io.CKPT_BEST}" in stop["message"]
    assert max(r["iter"] for r in metrics_rows(run) if "loss" in r) == 19

    found = next(f for f in diagnose(run) if f.kind == "stopped_early")
    assert "stopped at iter 20 of max_iters 40: 2 evaluations in a row without a better val loss" in found.evidence[0]
    assert "best val loss 2.5000 at iter 10: ckpt_best.pt holds the model from iter 10" in found.evidence[1]
    assert any("early_stop_evals above 2" in a for a in found.advice)


def test_resuming_stops_again_at_once_unless_early_stop_evals_is_raised(tiny_config, tmp_path, scripted_val):
    scripted_val.extend(VAL_LOSSES)
    train(early_config(tiny_config, always_save_checkpoint=False))
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_bytes()
    for more_iters in (40, 80):  # more iterations alone do not bring back patience
        with pytest.raises(UserError) as info:
            Trainer(early_config(tiny_config, init_from="resume", max_iters=more_iters))
        assert "is at iter 20, where val loss has not improved for 2 evaluations in a row" in str(info.value)
        assert "raise early_stop_evals above 2 (or set it to 0)" in str(info.value)
    assert (run / "metrics.jsonl").read_bytes() == before

    resumed = train(early_config(tiny_config, init_from="resume", early_stop_evals=3))  # iters 25..40: better
    assert resumed.loop.iter_num == 40 and resumed.loop.best_iter == 40
    assert events(run, "early_stop") == []  # cut back with the rows after the checkpoint: the run went on
    assert "stopped_early" not in [f.kind for f in diagnose(run)]


def test_off_by_default_and_never_at_the_last_evaluation(tiny_config, tmp_path, scripted_val):
    scripted_val.extend([4.0, 3.0, 3.5, 3.6, 3.7, 3.8, 3.9, 4.0, 4.1])
    assert train(early_config(tiny_config, early_stop_evals=0)).loop.iter_num == 40
    scripted_val.extend([4.0, 3.0, 3.1])
    trainer = train(early_config(tiny_config, max_iters=10, lr_decay_iters=10, early_stop_evals=1), overwrite=True)
    assert trainer.loop.iter_num == 10 and events(tmp_path / "run", "early_stop") == []  # it ended there anyway


def test_a_real_overfitting_run_stops_at_its_best(tmp_path, shakespeare_text):
    """No scripted losses: a model far too big for 600 characters overfits, and the run stops after it."""
    prepare_text(shakespeare_text[:600], tmp_path / "data")
    trainer = train(build_config({
        **TINY, "dataset": str(tmp_path / "data"), "out_dir": str(tmp_path / "run"), "n_embd": 64, "block_size": 16,
        "learning_rate": 3e-3, "min_lr": 3e-4, "max_iters": 150, "lr_decay_iters": 150, "eval_interval": 15,
        "log_interval": 5, "early_stop_evals": 2, "data_order": "epochs"}))
    vals = {r["iter"]: r["val_loss"] for r in metrics_rows(tmp_path / "run") if "val_loss" in r}
    best = min(vals, key=vals.get)
    assert trainer.loop.iter_num == best + 2 * 15 < 150
    assert saved_iter(tmp_path / "run", ckpt_io.CKPT_BEST) == best
