"""A training run's folder (out_dir): where each of its files lives, the lock a run holds on it, and the refusal to
start a new run over another one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from gptrain.runtime import outdir
from gptrain.runtime.names import ADAPTER, CKPT_BEST, CKPT_LAST, METRICS, PLOT, RUN_CONFIG, TENSORBOARD


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def last(self) -> Path:
        """The latest state, which a resume reads."""
        return self.path / CKPT_LAST

    @property
    def best(self) -> Path:
        """The best validation loss so far, which sample reads."""
        return self.path / CKPT_BEST

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def config(self) -> Path:
        """The resolved config the run trains with."""
        return self.path / RUN_CONFIG

    @property
    def plot(self) -> Path:
        return self.path / PLOT

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def adapter(self) -> Path:
        """A LoRA run's adapters in peft's format, ckpt_last.pt's."""
        return self.path / ADAPTER

    def claimed(self) -> contextlib.AbstractContextManager[outdir.FolderLock]:
        """One process per run folder, for the whole run (outdir.claimed)."""
        return outdir.claimed(self.path, "out_dir")

    def holds_a_run(self) -> bool:
        return "run" in outdir.holdings(self.path)

    def stale_temporaries(self) -> Iterator[Path]:
        """Files a process killed while writing left half-written (runtime/files.py names them .NAME.tmp)."""
        return self.path.glob(".*.tmp")
