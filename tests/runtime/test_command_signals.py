"""Ctrl-C and SIGTERM stop every command that works for a while (issue: nothing is lost, part 3): wherever the
signal lands, the command exits with 130 or 143 and one line, no traceback, its target holding the old set whole
or the new set whole, nothing of its own left behind. "Wherever" is made deterministic by a profiling hook that
sends the signal at the k-th Python or C call of the command, for k spread over the whole run."""

from __future__ import annotations

import os
import shutil
import signal
import sys

import pytest
from writers import WRITERS, assert_user_files, contents, no_leftovers, run_forked, user_files, writer

from gptrain.errors import Interrupted
from gptrain.runtime.child import run_in_child
from gptrain.runtime.signals import interruptible

POINTS = 8  # signals per command, spread evenly over its calls


def counting(entry, tally_file):
    """entry, counting the calls it makes (written to tally_file when it returns)."""
    def counted(argv):
        calls = [0]

        def hook(frame, event, arg):
            calls[0] += 1

        sys.setprofile(hook)
        try:
            entry(argv)
        finally:
            sys.setprofile(None)
            tally_file.write_text(str(calls[0]))
    return counted


def signalled_at(entry, call: int, signum: int):
    """entry, sending itself `signum` at its call number `call`."""
    def signalled(argv):
        calls, pid = [0], os.getpid()

        def hook(frame, event, arg):
            calls[0] += 1
            if calls[0] == call and os.getpid() == pid:  # not in a worker process forked with the hook in place
                sys.setprofile(None)
                os.kill(pid, signum)

        sys.setprofile(hook)
        try:
            entry(argv)
        finally:
            sys.setprofile(None)
    return signalled


def stopped_cleanly(log_text: str, code: int, signum: int) -> None:
    assert code == 128 + signum, log_text[-3000:]
    assert "Traceback" not in log_text, log_text[-3000:]
    assert log_text.strip().splitlines()[-1] in ("terminated by SIGTERM", "interrupted"), log_text[-500:]


@pytest.mark.slow
@pytest.mark.parametrize("kind", [w for w in WRITERS if w != "train --overwrite"])
def test_a_signal_anywhere_stops_a_writer_cleanly(kind, writer_inputs, writer_models, trained_run, char_dataset,
                                                 tmp_path):
    w = writer(kind, writer_inputs, writer_models, trained_run, char_dataset, tmp_path)
    log, tally = tmp_path / "log.txt", tmp_path / "calls.txt"
    user_files(w.target)
    assert run_forked(w.entry, [*w.old, "--overwrite"], log) == 0, log.read_text()
    pristine = tmp_path / "pristine"
    shutil.copytree(w.target, pristine, symlinks=True)
    new = [*w.new, "--overwrite"]
    assert run_forked(counting(w.entry, tally), new, log) == 0, log.read_text()
    new_set, calls = contents(w.target), int(tally.read_text())
    for point in range(POINTS):
        call = 1 + calls * (2 * point + 1) // (2 * POINTS)
        signum = (signal.SIGTERM, signal.SIGINT)[point % 2]
        shutil.rmtree(w.target)
        shutil.copytree(pristine, w.target, symlinks=True)
        log.write_text("")
        code = run_forked(signalled_at(w.entry, call, signum), new, log)
        stopped_cleanly(log.read_text(), code, signum)
        assert contents(w.target) in (contents(pristine), new_set), f"signal at call {call} of {calls}"
        assert_user_files(w.target)
        assert no_leftovers(w.target)


@pytest.mark.slow
def test_a_signal_anywhere_stops_an_evaluation_cleanly(trained_run, char_dataset, tmp_path):
    from gptrain.cli import main

    log, tally = tmp_path / "log.txt", tmp_path / "calls.txt"
    argv = ["eval", "--ckpt", str(trained_run), "--dataset", str(char_dataset)]
    assert run_forked(counting(main, tally), argv, log) == 0, log.read_text()
    calls = int(tally.read_text())
    for point in range(POINTS):
        signum = (signal.SIGTERM, signal.SIGINT)[point % 2]
        log.write_text("")
        code = run_forked(signalled_at(main, 1 + calls * (2 * point + 1) // (2 * POINTS), signum), argv, log)
        stopped_cleanly(log.read_text(), code, signum)


def test_work_in_a_child_process_is_stopped_with_its_parent(tmp_path):
    """The parent of a child that never returns (as tokenizers' trainer, in native code, does not for minutes) is
    stopped by SIGTERM at once, and ends the child."""
    from child_work import signal_parent_then_block

    pid_file = tmp_path / "child.pid"
    with pytest.raises(Interrupted), interruptible():
        run_in_child(signal_parent_then_block, os.getpid(), str(pid_file))
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)
