"""metrics.jsonl: one JSON object per logged step or evaluation, appended as the run goes."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def __enter__(self) -> MetricsLog:
        self._file = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def write(self, row: dict) -> None:
        # Flushed per row so `tail -f` and a crash both see every line that was logged.
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()


class NullMetrics:
    """Where ranks other than 0, and a Trainer before run(), send their rows: nowhere."""

    def __enter__(self) -> NullMetrics:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def write(self, row: dict) -> None:
        pass


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
