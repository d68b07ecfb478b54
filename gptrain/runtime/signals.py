"""Graceful interruption: the first SIGINT (Ctrl-C) or SIGTERM lets the loop finish its micro-batch and save; a
second one aborts at once. Work that has nothing to lose (an evaluation) is abandoned at once, between two
operations, however long it would still take."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

from gptrain.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Abandoned(BaseException):
    """Raised inside GracefulInterrupt.abandonable() by the first signal. A BaseException, as KeyboardInterrupt
    is: library code that catches Exception where the signal happens to land (tqdm does) must not swallow it."""


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # Python only delivers signals there


class GracefulInterrupt:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {}
        self._abandonable = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> GracefulInterrupt:
        if _in_main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def abandonable(self):
        """Inside this block the first signal raises Abandoned at once instead of waiting for the block to end
        (and check() raises it too, for a signal that came just before)."""
        self._abandonable = True
        try:
            self.check()
            yield
        finally:
            self._abandonable = False

    def check(self) -> None:
        if self._abandonable and self.requested:
            raise Abandoned

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum, f"{signal.Signals(signum).name} again: aborted at once, nothing saved")
        self.signum = signum
        # os.write, not print: a handler that prints while the interrupted code prints raises a reentrancy error.
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after the current micro-batch and saving; send it "
                    "again to abort at once\n".encode())
        if self._abandonable:
            raise Abandoned


_received: list[int] = []  # the signals an interruptible() command received, in order


@contextlib.contextmanager
def interruptible():
    """SIGTERM raises Interrupted (exit code 143), as Ctrl-C raises KeyboardInterrupt, so `finally` blocks run and
    a command stopped by either removes its temporary files and half-made folders. Each signal is also recorded
    (signal_received): the exception lands wherever the program is, and library code it lands in may turn it into
    another (numpy's tofile reports a TypeError), so a command's failure after a signal is that signal's doing."""
    _received.clear()
    if not _in_main_thread():
        yield
        return

    def terminate(signum, frame):
        _received.append(signum)
        raise Interrupted(signum, "terminated by SIGTERM")

    def interrupt(signum, frame):
        _received.append(signum)
        signal.default_int_handler(signum, frame)

    def unraisable(report):
        if not _received:  # after a signal: a finalizer failing on an object the signal left half-made (tqdm's)
            default_unraisable(report)

    default_unraisable, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, terminate),
                signal.SIGINT: signal.signal(signal.SIGINT, interrupt)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = default_unraisable
        _received.clear()  # the command is over: its signal must not stop what runs next in this process


def signal_received() -> int | None:
    """The first SIGINT or SIGTERM the running command received, if any."""
    return _received[0] if _received else None


def stop_if_signalled() -> None:
    """Raise the interruption again if a signal came and the program still runs on: its exception was lost where
    it landed (Python ignores exceptions raised in a finalizer, such as a generator being closed). Long loops call
    this at each step."""
    if _received:
        signum = _received[0]
        raise Interrupted(signum, "terminated by SIGTERM" if signum == signal.SIGTERM else "interrupted")


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM back for the block (a few renames that must not be separated), then deliver the
    first that came to the handler in place before."""
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


class StopRequest:
    """Inside this block Ctrl-C (SIGINT) sets `requested` instead of raising KeyboardInterrupt, for work that can
    stop cleanly at its next check: an answer in `gptrain chat` stops, and the program goes on."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        self.requested = False
        if _in_main_thread():
            self._previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def handle(self, signum, frame) -> None:
        self.requested = True


class _Stopped(Exception):
    pass


def stopped_within(seconds: float) -> bool:
    """Wait up to `seconds` for a SIGTERM; True when one came (and nothing else happens to the process). Outside
    the main thread, where Python delivers no signals, it does not wait."""
    if not _in_main_thread():
        return False

    def handle(signum, frame):
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        time.sleep(seconds)
        return False
    except _Stopped:
        return True
    finally:
        signal.signal(signal.SIGTERM, previous)
