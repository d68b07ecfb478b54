"""Graceful interruption: the first SIGINT (Ctrl-C) or SIGTERM lets the loop finish its step and save; a second
one aborts at once."""

from __future__ import annotations

import signal
import threading

from gptrain.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulInterrupt:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum, f"{signal.Signals(signum).name} again: aborted at once, nothing saved")
        self.signum = signum
