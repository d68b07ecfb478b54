"""Checkpoints written in the background: training waits only while the state is copied to host memory, then a
thread serialises the copy and publishes the file while training goes on.

The copy is taken between two steps, so the file holds exactly that step's state; it must be a real copy, since
the next steps change the weights and the optimizer's state in place. host_copy() makes one: every tensor that
still shares its memory with the training state (on a CPU all of them, on a GPU the few the optimizer keeps on the
host, such as AdamW's step counts) is copied, and the gathered tensors a GPU run's state dict already copied to
the host are kept as they are, so the copy costs the checkpoint's size in host memory once, never twice.

One write is in flight at a time: the owner waits for it (BackgroundWriter.wait) before it starts the next, before
it reads what the write publishes, and before the run ends; an error the write met is raised there.
torch.distributed.checkpoint's async_save does the same staging, but writes its own sharded folder format; a
gptrain checkpoint is one .pt file that `gptrain sample` and a resume at any world size load.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch


def tensors_in(value) -> Iterator[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples (an optimizer's state, say)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's own shard
    storage = local.untyped_storage()
    return (str(local.device), storage.data_ptr()) if storage.nbytes() else None


def host_copy(state, live: Iterable[torch.Tensor]):
    """`state` (nested dicts, lists and tuples of tensors and plain values) with nothing left that training can
    change: each tensor on the host, in memory of its own unless that memory is already the state's alone. `live`:
    the tensors training changes in place (parameters, buffers, optimizer state). Tensors that shared memory (tied
    weights) share their copy, as torch.save then writes them once, as it did before."""
    shared = {key for key in map(_storage_key, live) if key is not None}
    copies: dict[tuple[str, int], torch.UntypedStorage] = {}

    def copy_tensor(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key is None:  # no bytes: nothing to share
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        if tensor.device.type == "cpu" and key not in shared:
            return tensor  # the gather's own host copy
        if key not in copies:
            storage = tensor.untyped_storage()
            copies[key] = storage.clone() if tensor.device.type == "cpu" else storage.cpu()
        return torch.empty(0, dtype=tensor.dtype).set_(copies[key], tensor.storage_offset(), tensor.size(),
                                                       tensor.stride())

    def copy(value):
        if isinstance(value, torch.Tensor):
            return copy_tensor(value.detach())
        if isinstance(value, dict):  # an OrderedDict stays one (the file keeps its types)
            items = ((k, copy(v)) for k, v in value.items())
            return collections.OrderedDict(items) if isinstance(value, collections.OrderedDict) else dict(items)
        if isinstance(value, list):
            return [copy(v) for v in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(copy(v) for v in value)
        if isinstance(value, np.ndarray):
            return value.copy()
        return value  # numbers, strings, None: immutable

    return copy(state)


class Abandoned(Exception):
    """The run ended without waiting for the write (a second signal): it stops before publishing anything more."""


class BackgroundWriter:
    """One job at a time in a thread of its own. wait() blocks until the job has ended and raises the error it
    met, if any. A signal that interrupts wait() abandons the job: the process is leaving at once, so the job
    publishes nothing more from its next check() on (the thread is a daemon: it does not hold up the exit)."""

    def __init__(self, name: str):
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._abandoned = threading.Event()

    @property
    def busy(self) -> bool:
        """A job was started and not yet waited for (it may have ended already)."""
        return self._thread is not None

    def start(self, job: Callable[[], None]) -> None:
        if self._thread is not None:
            raise RuntimeError("a background write is still in flight: wait() for it first")
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(job,), name=self.name, daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Abandoned:
            pass
        except BaseException as exc:  # raised again in the owner's thread by wait()
            self._error = exc

    def check(self) -> None:
        """Called by the job between its parts: raises Abandoned once the owner stopped waiting for it."""
        if self._abandoned.is_set():
            raise Abandoned

    def wait(self) -> None:
        thread = self._thread
        if thread is None:
            return
        try:
            thread.join()
        except BaseException:  # a signal landed while waiting: the run leaves now
            self.abandon()
            raise
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def abandon(self) -> None:
        """Stop waiting for the job: it publishes nothing from its next check() on."""
        self._abandoned.set()
        self._thread = None
