"""Checkpoints written in the background: training goes on while a thread writes, the file is always a whole
checkpoint, a resume from one is exact, the run waits for its writes (next save, end, early stop, signal), and a
failed write ends the run with one error line.

No test depends on timing: HeldWrites makes every write wait until the run itself waits for it, so each write is
still in flight while the steps after its save run, and ends only through one of the run's waits."""

from __future__ import annotations

import copy
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from conftest import ROOT, events, metrics_rows, write_config

from gptrain import checkpoint as ckpt_io
from gptrain.cli import main, run_guarded
from gptrain.errors import Interrupted
from gptrain.evaluate import Evaluator
from gptrain.runtime.background_save import host_copy, tensors_in
from gptrain.runtime.publish import KILL_VARIABLE
from gptrain.train import Trainer, train

HOLD_LIMIT_S = 120  # only a broken wait gets near it: a write the run never waits for fails the test then


class HeldWrites:
    """Each checkpoint write blocks (in the writer thread) until the run waits for it: RunCheckpoints.wait,
    called while the write is in flight, releases it. Records which iterations were stepped while each write was
    held, and what was written, in order."""

    def __init__(self, monkeypatch, on_written=None):
        self.cond = threading.Condition()
        self.submitted = 0  # writes started (main thread)
        self.released = 0  # writes the run has waited for (main thread)
        self.started = 0  # writes that reached save_checkpoint (writer thread)
        self.written: list[int] = []  # iterations whose file is in place, in order
        self.stepped: dict[int, list[int]] = {}  # held write's iteration -> iterations stepped meanwhile
        self.held_iter: int | None = None
        self.on_written = on_written
        real_save, real_wait = ckpt_io.save_checkpoint, ckpt_io.RunCheckpoints.wait
        real_start, real_iteration = ckpt_io.RunCheckpoints.write_in_background, Trainer.run_iteration
        held = self

        def save_checkpoint(state, path):
            with held.cond:
                held.started += 1
                mine = held.started
                if not held.cond.wait_for(lambda: held.released >= mine, timeout=HOLD_LIMIT_S):
                    raise AssertionError(f"the run never waited for its write of iter {state['progress']['iter_num']}")
            real_save(state, path)
            held.written.append(state["progress"]["iter_num"])
            if held.on_written:
                held.on_written(state["progress"]["iter_num"], path)

        def write_in_background(self, state, it, best=False):
            real_start(self, state, it, best)  # waits for the previous write first
            with held.cond:
                held.submitted += 1
                held.held_iter = it
                held.stepped[it] = []

        def wait(self):
            if self.writer.busy:
                with held.cond:
                    held.released = held.submitted
                    held.held_iter = None
                    held.cond.notify_all()
            real_wait(self)

        def run_iteration(self, it, measure_update=False):
            if held.held_iter is not None:
                held.stepped[held.held_iter].append(it)
            return real_iteration(self, it, measure_update)

        monkeypatch.setattr(ckpt_io, "save_checkpoint", save_checkpoint)
        monkeypatch.setattr(ckpt_io.RunCheckpoints, "write_in_background", write_in_background)
        monkeypatch.setattr(ckpt_io.RunCheckpoints, "wait", wait)
        monkeypatch.setattr(Trainer, "run_iteration", run_iteration)

    def release_all(self) -> None:
        """Let any write still held go (a failing test must not leave a thread blocked for minutes)."""
        with self.cond:
            self.released = 1 << 30
            self.cond.notify_all()


@pytest.fixture
def held_writes(monkeypatch):
    made = []

    def make(on_written=None) -> HeldWrites:
        made.append(HeldWrites(monkeypatch, on_written))
        return made[-1]

    yield make
    for held in made:
        held.release_all()


def saved_iter(path) -> int:
    return ckpt_io.load_checkpoint(path)["progress"]["iter_num"]


def step_losses(run_dir, start):
    by_iter = {r["iter"]: r["loss"] for r in metrics_rows(run_dir) if "loss" in r}  # a resume's rows win
    return [by_iter[i] for i in sorted(by_iter) if i >= start]


# ----- the copy ---------------------------------------------------------------------------------------------------


def test_the_saved_state_is_a_copy_training_cannot_change(tiny_config):
    """What checkpoint_state returns shares no memory with the weights or optimizer state (which the next steps
    change in place), but tensors that shared memory (the tied embedding and head) still share their copy."""
    trainer = Trainer(tiny_config(dropout=0.1))
    for it in range(2):  # AdamW's moments and step counts exist from the first step on
        trainer.set_lr(it)
        trainer.train_step()
    state = trainer.checkpoint_state()
    frozen = copy.deepcopy(state)
    live = {t.untyped_storage().data_ptr() for t in trainer.live_tensors()}
    assert not any(t.untyped_storage().data_ptr() in live for t in tensors_in(state))
    weights = state["model"]
    assert weights["lm_head.weight"].untyped_storage().data_ptr() == \
        weights["transformer.wte.weight"].untyped_storage().data_ptr()  # written once, as before
    for it in range(2, 4):
        trainer.set_lr(it)
        trainer.train_step()
    for a, b in zip(tensors_in(state), tensors_in(frozen), strict=True):
        assert torch.equal(a, b)
    assert state["progress"] == frozen["progress"]


def test_host_copy_copies_only_what_training_shares():
    live = torch.randn(4, 3)
    gathered = torch.randn(4, 3)  # a tensor the gather already copied to the host: kept, not copied again
    state = {"a": live, "b": live[1:], "c": gathered, "empty": torch.empty(0), "nested": [(1, "x", None)]}
    copied = host_copy(state, [live])
    assert copied["c"].untyped_storage().data_ptr() == gathered.untyped_storage().data_ptr()
    assert copied["a"].untyped_storage().data_ptr() == copied["b"].untyped_storage().data_ptr()
    assert copied["a"].untyped_storage().data_ptr() != live.untyped_storage().data_ptr()
    live.add_(1)
    assert torch.equal(copied["a"] + 1, live) and torch.equal(copied["b"] + 1, live[1:])
    assert copied["nested"] == [(1, "x", None)] and copied["nested"] is not state["nested"]


# ----- training goes on; the run waits --------------------------------------------------------------------------


def test_training_goes_on_while_a_checkpoint_is_written(tiny_config, tmp_path, held_writes, capsys):
    held = held_writes()
    trainer = train(tiny_config(max_iters=12, lr_decay_iters=12, eval_interval=100, checkpoint_interval=4))
    run = tmp_path / "run"
    # Each save's write stayed in flight over the next four steps; the next save (or the end) waited for it.
    assert held.stepped == {4: [4, 5, 6, 7], 8: [8, 9, 10, 11], 12: []}
    assert held.written == [4, 8, 12] and not trainer.checkpoints.writer.busy
    assert saved_iter(run / ckpt_io.CKPT_LAST) == 12 and saved_iter(run / ckpt_io.CKPT_BEST) == 12
    assert trainer.checkpoints.last_iter == 12
    assert f"(in {run / ckpt_io.CKPT_BEST})" in capsys.readouterr().out  # the closing line found it
    assert not list(run.glob(".*.tmp"))


def test_the_end_of_a_run_waits_for_its_last_write(tiny_config, tmp_path, held_writes, capsys):
    """The last write (the final evaluation's, also publishing ckpt_best.pt) is released only by the run's own
    wait at the end: when train() returns, both files hold the last iteration and the closing line names
    ckpt_best.pt as the place of the best model."""
    held = held_writes()
    train(tiny_config(max_iters=6, lr_decay_iters=6, eval_interval=3))
    run = tmp_path / "run"
    assert held.written == [3, 6]
    assert saved_iter(run / ckpt_io.CKPT_LAST) == 6 and saved_iter(run / ckpt_io.CKPT_BEST) == 6
    assert f"at iter 6 (in {run / ckpt_io.CKPT_BEST})" in capsys.readouterr().out


@pytest.fixture
def scripted_val(monkeypatch):
    pending = []

    def estimate_loss(self):
        loss = pending.pop(0)
        return {"train": loss, "val": loss}

    monkeypatch.setattr(Evaluator, "estimate_loss", estimate_loss)
    return pending


def test_an_early_stop_waits_for_its_writes(tiny_config, tmp_path, held_writes, scripted_val):
    """Val improves up to iter 10, then not at 15 and 20: the run stops at 20. The stop's message names
    ckpt_best.pt (published by iter 10's write) and ckpt_last.pt holds iter 20 when train() returns."""
    scripted_val.extend([4.0, 3.0, 2.5, 2.6, 2.55])
    held = held_writes()
    train(tiny_config(max_iters=40, lr_decay_iters=40, eval_interval=5, early_stop_evals=2,
                      always_save_checkpoint=True))
    run = tmp_path / "run"
    assert held.written == [5, 10, 15, 20] and held.stepped[15] == [15, 16, 17, 18, 19]
    assert saved_iter(run / ckpt_io.CKPT_LAST) == 20 and saved_iter(run / ckpt_io.CKPT_BEST) == 10
    (stop,) = events(run, "early_stop")
    assert f"in {run / ckpt_io.CKPT_BEST}" in stop["message"]


def test_a_signal_stop_waits_for_the_write_in_flight_and_its_own(tiny_config, tmp_path, held_writes, monkeypatch):
    """SIGTERM arrives while iter 4's write is in flight: the stop saves iter 6 after waiting for iter 4's write,
    and the Interrupted that ends the run comes only once iter 6's file is in place."""
    held = held_writes()
    trainer = Trainer(tiny_config(max_iters=40, lr_decay_iters=40, eval_interval=100, checkpoint_interval=4))
    step = trainer.train_step

    def train_step(*args, **kwargs):
        result = step(*args, **kwargs)
        if trainer.loop.iter_num == 5:
            trainer.interrupt.signum = signal.SIGTERM  # as the handler records it, during step 5
        return result

    monkeypatch.setattr(trainer, "train_step", train_step)
    with pytest.raises(Interrupted, match="at iter 6: saved"):
        trainer.run()
    assert held.written == [4, 6] and held.stepped[4] == [4, 5]
    assert saved_iter(tmp_path / "run" / ckpt_io.CKPT_LAST) == 6 and not trainer.checkpoints.writer.busy


def test_a_write_abandoned_by_a_second_signal_publishes_nothing_more(tmp_path, monkeypatch):
    """A second signal ends the run without waiting for the write in flight (settle(abandon=True)): the file it
    was already writing lands whole, but ckpt_best.pt is not published after it."""
    from gptrain.runtime.rundir import RunDir

    checkpoints = ckpt_io.RunCheckpoints(RunDir(tmp_path))
    started, go = threading.Event(), threading.Event()
    real_save = ckpt_io.save_checkpoint

    def held_save(state, path):
        started.set()
        assert go.wait(HOLD_LIMIT_S)
        real_save(state, path)

    monkeypatch.setattr(ckpt_io, "save_checkpoint", held_save)
    checkpoints.write_in_background({"progress": {"iter_num": 3}}, 3, best=True)
    thread = checkpoints.writer._thread
    assert started.wait(HOLD_LIMIT_S)
    checkpoints.settle(abandon=True)
    assert not checkpoints.writer.busy
    go.set()
    thread.join(HOLD_LIMIT_S)
    assert torch.load(tmp_path / ckpt_io.CKPT_LAST)["progress"]["iter_num"] == 3
    assert not (tmp_path / ckpt_io.CKPT_BEST).exists()


# ----- exact on resume; whole after kill -9 ------------------------------------------------------------------------


def test_a_resume_from_a_checkpoint_written_while_training_went_on_is_exact(tiny_config, tmp_path, held_writes):
    """Iter 8's checkpoint is written while iterations 8-15 change the weights and optimizer state in place;
    resuming from it gives the uninterrupted run's losses and weights bit for bit (so it holds iter 8's state)."""
    common = dict(max_iters=16, lr_decay_iters=16, eval_interval=100, checkpoint_interval=8, dropout=0.1,
                  batch_size=4, gradient_accumulation_steps=2)
    full = train(tiny_config(out_dir=str(tmp_path / "full"), **common))
    split = tmp_path / "split"
    aside = tmp_path / "iter8.pt"

    def keep_iter_8(it, path):
        if it == 8:
            shutil.copy(path, aside)

    held = held_writes(keep_iter_8)
    train(tiny_config(out_dir=str(split), **common))
    assert held.stepped[8] == list(range(8, 16))
    shutil.copy(aside, split / ckpt_io.CKPT_LAST)  # as if the run had stopped right after iter 8's write
    resumed = train(tiny_config(out_dir=str(split), init_from="resume", **common))
    assert step_losses(split, 8) == step_losses(tmp_path / "full", 8) and len(step_losses(split, 8)) == 8
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(full.optimizer.state.values(), resumed.optimizer.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_during_a_background_write_leaves_the_old_checkpoint_whole(tmp_path, char_dataset):
    """The process kills itself (GPTRAIN_KILL_AT) once a background write has serialised iter 8 into its temporary
    file, while training goes on: ckpt_last.pt is iter 4's file, byte for byte; the next run removes the temporary
    file, resumes from iter 4 and matches an uninterrupted run."""
    config = write_config(tmp_path, char_dataset, max_iters=12, lr_decay_iters=12, eval_interval=4, dropout=0.1)
    run = tmp_path / "run"
    gptrain = [sys.executable, "-m", "gptrain", "train", str(config)]

    def cli(*args, **env):
        return subprocess.run([*gptrain, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env})

    first = cli("--max_iters=4")
    assert first.returncode == 0, first.stderr
    before = (run / ckpt_io.CKPT_LAST).read_bytes()
    killed = cli("--init_from=resume", **{KILL_VARIABLE: ckpt_io.SERIALISED})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / ckpt_io.CKPT_LAST).read_bytes() == before
    assert (run / f".{ckpt_io.CKPT_LAST}.tmp").is_file()  # the write it killed
    assert saved_iter(run / ckpt_io.CKPT_LAST) == 4
    resumed = cli("--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "at iter 4" in resumed.stdout and not (run / f".{ckpt_io.CKPT_LAST}.tmp").exists()
    full = cli(f"--out_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    assert step_losses(run, 4) == step_losses(tmp_path / "full", 4) and len(step_losses(run, 4)) == 8
    assert saved_iter(run / ckpt_io.CKPT_LAST) == 12


# ----- a failed write -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["ENOSPC", "EACCES"])
@pytest.mark.parametrize("fails_at", [4, 12])
def test_a_failed_background_write_ends_the_run_with_one_error_line(tmp_path, char_dataset, monkeypatch, capsys,
                                                                    failing, fails_at):
    """The write of iter `fails_at` fails in the writer thread (a full disk, a folder it may not write): the run
    trains on until its next wait (the next save, or its end), then ends with one `error:` line and exit code 1
    (a checkpoint could not be written; reliability.md), the previous checkpoint whole."""
    config = write_config(tmp_path, char_dataset, max_iters=12, lr_decay_iters=12, eval_interval=100,
                          checkpoint_interval=4)
    real_save = torch.save
    number = getattr(errno, failing)

    def failing_save(obj, f):
        if isinstance(obj, dict) and obj.get("progress", {}).get("iter_num") == fails_at:
            f.write(b"partial checkpoint bytes")
            raise OSError(number, os.strerror(number))
        return real_save(obj, f)

    monkeypatch.setattr(ckpt_io.torch, "save", failing_save)
    assert run_guarded(main, ["train", str(config)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"could not write {tmp_path / 'run' / ckpt_io.CKPT_LAST} at iter {fails_at} ({os.strerror(number)})" \
        in errors[0]
    run = tmp_path / "run"
    trained = max(r["iter"] for r in metrics_rows(run) if "loss" in r)
    if fails_at == 4:  # surfaced at the next save's wait, after four more steps
        assert trained == 7 and "no checkpoint was written before" in errors[0]
        assert not (run / ckpt_io.CKPT_LAST).exists()
    else:  # surfaced at the end's wait; iter 8's checkpoint is whole and named in the advice
        assert trained == 11 and "the previous checkpoint is intact" in errors[0] and "(iter 8)" in errors[0]
        assert saved_iter(run / ckpt_io.CKPT_LAST) == 8
    assert not list(run.glob(".*.tmp"))
