"""Publishing a set of files as a whole (issue: nothing is lost, part 3): the protocol itself, and every command
that writes a set of files killed with SIGKILL at each step of it in turn (GPTRAIN_KILL_AT), deterministically.
After every kill the target holds its old set whole or the new set whole, the user's own files untouched, and the
same command run again cleans up what the kill left and succeeds."""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path

import pytest
from writers import (
    WRITERS,
    Writer,
    assert_user_files,
    contents,
    no_leftovers,
    run_forked,
    unsupported_exchange,
    user_files,
    writer,
)

from gptrain.errors import Interrupted, UserError
from gptrain.runtime import names, outdir, publish
from gptrain.runtime.publish import Stage, staged
from gptrain.runtime.signals import interruptible

BEFORE_THE_SWAP = ("staged", "written", "carried", "synced")
AFTER_THE_SWAP = ("swapped", "clearing")
ONLY_IN_TWO_RENAMES = ("moved-aside", "moved-in")  # where the file system cannot swap two folders


def test_the_steps_are_the_ones_the_tests_kill_at():
    assert set(publish.STEPS) == {*BEFORE_THE_SWAP, *AFTER_THE_SWAP, *ONLY_IN_TWO_RENAMES}


# ----- the protocol -------------------------------------------------------------------------------------------


def test_publish_replaces_the_set_and_keeps_everything_else(tmp_path):
    target = tmp_path / "out"
    user_files(target)
    (target / "train.bin").write_bytes(b"old")
    (target / "val_mask.bin").write_bytes(b"old mask")  # the old set had a file the new one lacks
    with outdir.claimed(target, "--out"):
        lock_inode = (target / names.LOCK_NAME).stat().st_ino
        with staged(target, names.GPTRAIN_OUTPUT) as stage:
            stage.write("train.bin", b"new")
            stage.publish()
        assert (target / names.LOCK_NAME).stat().st_ino == lock_inode  # the lock held stays the folder's lock
    assert (target / "train.bin").read_bytes() == b"new" and not (target / "val_mask.bin").exists()
    assert_user_files(target)
    assert no_leftovers(target)


def test_a_failure_before_publishing_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "out"
    user_files(target)
    (target / "meta.json").write_text("old")
    with pytest.raises(UserError, match="bad input"), staged(target, names.GPTRAIN_OUTPUT) as stage:
        stage.write("meta.json", b"new")
        raise UserError("bad input")
    assert (target / "meta.json").read_text() == "old"
    assert_user_files(target)
    assert no_leftovers(target)


def test_a_name_not_listed_as_the_outputs_own_is_a_programming_error(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError, match="not among the names"), staged(tmp_path / "out", ["meta.json"]) as stage:
        stage.write("val.bin", b"")
        stage.publish()
    with pytest.raises(RuntimeError, match="GPTRAIN_NAMES"):
        Stage(tmp_path / "out", ["notes.txt"])
    assert no_leftovers(tmp_path / "out")


def test_without_a_swap_two_renames_publish_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "exchange", unsupported_exchange)
    test_publish_replaces_the_set_and_keeps_everything_else(tmp_path)


def test_a_mount_point_is_refused_with_one_line(tmp_path, monkeypatch):
    def busy(first, second):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(publish, "exchange", busy)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "meta.json").write_text("old")
    with pytest.raises(UserError, match="mount point"), staged(tmp_path / "out", ["meta.json"]) as stage:
        stage.write("meta.json", b"new")
        stage.publish()
    assert (tmp_path / "out" / "meta.json").read_text() == "old" and no_leftovers(tmp_path / "out")


def test_a_file_made_in_the_target_while_it_is_replaced_is_moved_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    carry_over = publish.carry_over

    def carry_then_a_file_appears(source, destination, skip=()):
        carry_over(source, destination, skip)
        (target / "late.txt").write_text("written meanwhile")  # after the staging folder took its links

    monkeypatch.setattr(publish, "carry_over", carry_then_a_file_appears)
    with staged(target, ["meta.json"]) as stage:
        stage.write("meta.json", b"new")
        stage.publish()
    assert (target / "late.txt").read_text() == "written meanwhile" and (target / "meta.json").read_bytes() == b"new"
    assert no_leftovers(target)


def test_the_current_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="current folder"):
        Stage(Path("."), ["meta.json"])
    with pytest.raises(UserError, match="current folder"):
        Stage(tmp_path.parent, ["meta.json"])


def test_a_signal_during_the_swap_takes_effect_after_it(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM in the middle of the swap's renames is held back until they are done."""
    monkeypatch.setattr(publish, "exchange", unsupported_exchange)
    renames = []

    def rename_and_signal(source, destination):
        renames.append(source)
        if len(renames) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        os.replace(source, destination)

    monkeypatch.setattr(publish.os, "rename", rename_and_signal)
    target = tmp_path / "out"
    target.mkdir()
    (target / "meta.json").write_text("old")
    with pytest.raises(Interrupted), interruptible(), staged(target, ["meta.json"]) as stage:
        stage.write("meta.json", b"new")
        stage.publish()
    assert len(renames) == 3 and (target / "meta.json").read_bytes() == b"new"
    monkeypatch.undo()
    assert no_leftovers(target)


# ----- every writer, killed at each step ------------------------------------------------------------------------


def kill_at_each_step(w: Writer, steps, pristine: Path | None, log: Path, overwrite: bool, two_renames=False) -> int:
    """Kill the new command at each step; check the target after each kill and after the command run again.
    Returns how many kills were checked."""
    new = [*w.new, "--overwrite"] if overwrite else w.new
    old_set = contents(pristine) if pristine else {}
    for step in steps:
        shutil.rmtree(w.target, ignore_errors=True)
        if pristine:
            shutil.copytree(pristine, w.target, symlinks=True)
        code = run_forked(w.entry, new, log, kill_at=step, two_renames=two_renames)
        assert code == -signal.SIGKILL, f"{step}: exit code {code}\n{log.read_text()[-2000:]}"
        expected = old_set if step in (*BEFORE_THE_SWAP, "moved-aside") else w.new_set
        if step == "moved-aside":  # the target is absent for an instant: its old set lies beside it whole
            assert contents(publish.aside_folder(w.target)) == old_set
        else:
            assert contents(w.target) == expected, f"killed at {step}"
        if pristine:
            assert_user_files(w.target if step != "moved-aside" else publish.aside_folder(w.target))
        again = run_forked(w.entry, new, log)
        assert again == 0, f"the command again after a kill at {step}: exit code {again}\n{log.read_text()[-2000:]}"
        if w.fresh or overwrite:
            assert contents(w.target) == w.new_set or "ckpt_last.pt" in contents(w.target)
        if pristine:
            assert_user_files(w.target)
        assert no_leftovers(w.target), sorted(p.name for p in w.target.parent.iterdir())
    return len(steps)


@pytest.mark.slow
@pytest.mark.parametrize("kind", WRITERS)
def test_every_writer_killed_at_each_step_leaves_a_whole_set(kind, writer_inputs, writer_models, trained_run,
                                                             char_dataset, tmp_path):
    w = writer(kind, writer_inputs, writer_models, trained_run, char_dataset, tmp_path)
    log = tmp_path / "log.txt"
    user_files(w.target)
    assert run_forked(w.entry, [*w.old, "--overwrite"], log) == 0, log.read_text()
    pristine = tmp_path / "pristine"
    shutil.copytree(w.target, pristine, symlinks=True)
    assert contents(pristine), "the old set"
    assert run_forked(w.entry, [*w.new, "--overwrite"], log) == 0, log.read_text()
    w.new_set = {} if kind == "train --overwrite" else contents(w.target)
    assert w.new_set and w.new_set != contents(pristine) or kind == "train --overwrite"
    kills = kill_at_each_step(w, (*BEFORE_THE_SWAP, *AFTER_THE_SWAP), pristine, log, overwrite=True)
    if w.fresh:
        kills += kill_at_each_step(w, (*BEFORE_THE_SWAP, *AFTER_THE_SWAP), None, log, overwrite=False)
    if kind in ("prepare_text", "export-hf"):
        kills += kill_at_each_step(w, publish.STEPS, pristine, log, overwrite=True, two_renames=True)
    print(f"{kind}: {kills} kills")
