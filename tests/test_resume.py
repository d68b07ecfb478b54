"""Exact resume: N iterations, stop, N more equals 2N without stopping, bit for bit (CPU, float32)."""

import json

import pytest
import torch
from conftest import metrics_rows

from gptrain import checkpoint as ckpt_io
from gptrain.train import train


def step_losses(run_dir, start):
    rows = metrics_rows(run_dir)
    by_iter = {r["iter"]: r["loss"] for r in rows if "loss" in r}  # a resumed run's rows come later and win
    return [by_iter[i] for i in sorted(by_iter) if i >= start]


@pytest.mark.parametrize("accum, stop_at, options", [
    (1, 12, {}), (2, 10, {}), (2, 10, dict(optimizer="muon", pos_emb="rope", mlp="relu2", lr_schedule="wsd"))])
def test_stop_and_resume_equals_uninterrupted(tiny_config, tmp_path, accum, stop_at, options):
    common = dict(max_iters=24, lr_decay_iters=24, eval_interval=6, gradient_accumulation_steps=accum,
                  dropout=0.1, batch_size=4, **options)  # dropout: the torch RNG must be restored too
    full = train(tiny_config(out_dir=str(tmp_path / "full"), **common))
    train(tiny_config(out_dir=str(tmp_path / "split"), **{**common, "max_iters": stop_at}))
    resumed = train(tiny_config(out_dir=str(tmp_path / "split"), init_from="resume", **common))

    assert step_losses(tmp_path / "split", stop_at) == step_losses(tmp_path / "full", stop_at)
    assert len(step_losses(tmp_path / "full", stop_at)) == 24 - stop_at
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(full.optimizer.state.values(), resumed.optimizer.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.loop == full.loop  # iteration, best val loss and where it came from


def test_checkpoint_holds_everything_to_continue(tiny_config, tmp_path):
    train(tiny_config(max_iters=6, eval_interval=3, dtype="float16"))
    state = ckpt_io.load_checkpoint(tmp_path / "run" / ckpt_io.CKPT_LAST)
    assert set(state) >= {"model", "optimizer", "scaler", "model_config", "train_config", "dataset_meta",
                          "progress", "rng", "sampler"}
    assert state["scaler"]["scale"] > 0
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["progress"]["iter_num"] == 6 and state["progress"]["best_iter"] in (3, 6)
    assert json.dumps([state["train_config"], state["dataset_meta"], state["sampler"], state["progress"]])


def test_checkpoint_interval_saves_the_latest_regardless_of_val(tiny_config, tmp_path, monkeypatch):
    saved = []
    real_save = ckpt_io.save_checkpoint

    def recording_save(state, path):
        saved.append((state["progress"]["iter_num"], path.name))
        real_save(state, path)

    monkeypatch.setattr(ckpt_io, "save_checkpoint", recording_save)
    train(tiny_config(max_iters=8, eval_interval=100, checkpoint_interval=3, always_save_checkpoint=False))
    # Every 3 iterations, then once at the end (where the final evaluation's save already covers it).
    assert saved == [(3, "ckpt_last.pt"), (6, "ckpt_last.pt"), (8, "ckpt_last.pt")]
    assert (tmp_path / "run" / "ckpt_best.pt").is_file()  # the final eval improved on iter 0


def test_overwrite_starts_over(tiny_config, tmp_path):
    train(tiny_config(max_iters=4, eval_interval=2))
    trainer = train(tiny_config(max_iters=2, eval_interval=2, seed=5), overwrite=True)
    state = ckpt_io.load_checkpoint(tmp_path / "run" / ckpt_io.CKPT_LAST)
    assert state["progress"]["iter_num"] == 2 and state["train_config"]["seed"] == 5
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "start"' in r for r in rows) == 1  # the old run's log went with it
    assert trainer.loop.iter_num == 2


def test_a_signal_between_micro_batches_undoes_the_step_exactly(tiny_config, tmp_path, monkeypatch):
    """SIGTERM in the middle of a step's micro-batches drops the step and saves; the resume takes the same step
    again (same batches, same dropout masks), so the result equals an uninterrupted run bit for bit."""
    import itertools
    import signal

    from gptrain.errors import Interrupted
    from gptrain.train import Trainer

    common = dict(max_iters=8, lr_decay_iters=8, eval_interval=100, gradient_accumulation_steps=3, dropout=0.1,
                  batch_size=4)
    full = train(tiny_config(out_dir=str(tmp_path / "full"), **common))
    trainer = Trainer(tiny_config(out_dir=str(tmp_path / "split"), **common))
    calls, draw = itertools.count(), trainer.train_batches.next_batch

    def next_batch():
        if next(calls) == 5 * 3 + 1:  # step 5's second micro-batch
            trainer.interrupt.signum = signal.SIGTERM
        return draw()

    monkeypatch.setattr(trainer.train_batches, "next_batch", next_batch)
    with pytest.raises(Interrupted, match="at iter 5"):
        trainer.run()
    assert ckpt_io.load_checkpoint(tmp_path / "split" / ckpt_io.CKPT_LAST)["progress"]["iter_num"] == 5
    resumed = train(tiny_config(out_dir=str(tmp_path / "split"), init_from="resume", **common))
    assert step_losses(tmp_path / "split", 0) == step_losses(tmp_path / "full", 0)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
