"""Long calls into native code that a signal cannot interrupt (Hugging Face tokenizers' BPE trainer merges pairs
for minutes without returning to Python, where signal handlers run) go to a child process. The parent waits in a
read that a signal does interrupt, and kills the child on its way out: Ctrl-C and SIGTERM take effect at once."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable

from gptrain.errors import UserError
from gptrain.runtime.signals import signals_deferred

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_in_child(function: Callable, *args):
    """function(*args) in a fresh process; returns its result, or raises the UserError it raised."""
    context = multiprocessing.get_context("spawn")  # nothing of this process's threads or locks is inherited
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=child_main, args=(send, function, args, os.getpid()), daemon=True)
    try:
        with signals_deferred():  # started and known to the finally below, or not started
            child.start()
        send.close()
        kind, value = receive.recv()
    except EOFError:
        raise RuntimeError(f"the process running {function.__name__} ended without a result (exit code "
                           f"{child.exitcode}); its error is printed above") from None
    finally:
        try:
            end(child, receive)
        finally:  # again: a signal can land as the first call begins, before it holds signals back
            end(child, receive)
    if kind == "error":
        raise UserError(value)
    return value


def end(child, receive) -> None:
    with signals_deferred():
        if child.pid is not None:
            child.kill()
            child.join()
        receive.close()


def child_main(send, function: Callable, args: tuple, parent: int) -> None:
    # A terminal's Ctrl-C reaches the whole process group: the parent handles it and ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    try:
        result = ("ok", function(*args))
    except UserError as exc:
        result = ("error", str(exc))
    send.send(result)
    send.close()


def die_with_parent(parent: int) -> None:
    """A parent killed with SIGKILL cannot end its child: the kernel does, where it can (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request above was in place
        os._exit(1)
