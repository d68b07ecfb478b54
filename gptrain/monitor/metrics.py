"""metrics.jsonl: one JSON object per logged step, evaluation or event, appended as the run goes.

A crash can tear the last line (a process killed mid-write). Readers skip a torn last line with a note; a
resumed run first cuts the file back to what its checkpoint had seen (checkpoints record the file's length),
which removes both a torn line and the rows logged after the checkpoint, so no iteration appears twice.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from gptrain.errors import UserError
from gptrain.runtime.files import decode_utf8, read_bytes, write_atomically

FIX = "it is not a gptrain metrics.jsonl, or it was damaged: remove the bad lines"


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: a non-finite figure is written as null."""
    return value if math.isfinite(value) else None


class MetricsLog:
    """Appends rows to metrics.jsonl, and hands each on to `copies` (the run trackers) when given."""

    def __init__(self, path: Path, copies=None):
        self.path = path
        self.copies = copies  # an object with write(row) and close(), e.g. monitor.trackers.Trackers
        self._file = None

    def __enter__(self) -> MetricsLog:
        self._file = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        if self.copies is not None:
            self.copies.close()

    def write(self, row: dict) -> None:
        # Flushed per row so `tail -f` and a crash both see every line that was logged.
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.copies is not None:
            self.copies.write(row)

    @property
    def length(self) -> int | None:
        """Bytes written so far: a checkpoint records it, so a resume can cut the file back to it."""
        return self._file.tell() if self._file is not None and not self._file.closed else None


class NullMetrics:
    """Where ranks other than 0, and a Trainer before run(), send their rows: nowhere."""

    length = None

    def __enter__(self) -> NullMetrics:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def write(self, row: dict) -> None:
        pass


def read_metrics(path: Path, note=None) -> list[dict]:
    """Every row of a metrics.jsonl, checked. A torn last line is skipped (with a note on stderr); any other
    line that is not a metrics row is a UserError naming its line number."""
    text = decode_utf8(read_bytes(path, "metrics file", "give the out_dir of a gptrain run"), path, "metrics file")
    lines = text.split("\n")
    complete, last = lines[:-1], lines[-1]  # `last` is "" when the file ends with a newline, as it should
    rows = []
    for number, line in enumerate(complete, 1):
        if line.strip():
            row = _parse(line)
            if row is TORN and number == len(complete) and not last.strip():
                _note(note, f"note: {path}: skipped line {number}, torn by a crash while it was written")
                continue
            rows.append(_checked(row, path, number))
    if last.strip():  # no newline at the end: the write was cut short
        row = _parse(last)
        if row is TORN or _problem(row):
            _note(note, f"note: {path}: skipped line {len(lines)}, torn by a crash while it was written")
        else:
            rows.append(_checked(row, path, len(lines)))
    return rows


def _note(note, message: str) -> None:
    (note or (lambda m: print(m, file=sys.stderr)))(message)


TORN = object()  # what _parse gives for a line that is not JSON at all


def _parse(line: str):
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError, as is a 5,000-digit number
        return TORN


def _checked(row, path: Path, number: int) -> dict:
    problem = "is not valid JSON" if row is TORN else _problem(row)
    if problem:
        raise UserError(f"{path}:{number} {problem}; {FIX}")
    # Older files (and hand-made ones) may hold NaN or Infinity: readers see null, as gptrain writes now.
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _problem(row) -> str | None:
    """Why a parsed line is not a metrics row, or None."""
    if not isinstance(row, dict):
        return f"holds {JSON_NAMES.get(type(row), 'a value')}, not a metrics row (an object)"
    if not _is_int(row.get("iter")) or row["iter"] < 0:
        return "has no valid 'iter'"
    if "event" in row:
        if not isinstance(row["event"], str):
            return "has an 'event' that is not a string"
        return _start_problem(row) if row["event"] == "start" else None
    if "val_loss" in row:
        fields = {"train_loss": True, "val_loss": True}
    elif "loss" in row:
        fields = {"loss": True, "lr": False, "grad_norm": True, "ms": False, "tokens_per_s": False}
    else:
        return "is neither a step, an evaluation nor an event"
    for name, nullable in fields.items():
        value = row.get(name)
        if name not in row or not (_is_number(value) or (nullable and value is None)):
            return f"has no valid {name!r}"
    return None


JSON_NAMES = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false",
              type(None): "null"}
# The start row's facts that diagnose and plot compute with: what each must be when present.
START_FIELDS = {"vocab_size": "count", "n_params": "count", "n_trainable": "count", "flops_per_token": "number",
                "peak_flops": "number", "peak_busy": "number", "threads": "count", "cpus": "count",
                "tokens_per_iter": "count", "world_size": "count"}


def _start_problem(row: dict) -> str | None:
    for name, kind in START_FIELDS.items():
        value = row.get(name)
        if value is None:
            continue
        if not _is_number(value) or value < (1 if kind == "count" else 0) or (kind == "count" and not _is_int(value)):
            return f"has an invalid {name!r} in its start row"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cut_back(path: Path, length: int | None, iter_num: int) -> int:
    """Before a resume appends: drop what was logged after the checkpoint (and any torn line). Cuts at the
    byte length the checkpoint recorded when it can; otherwise (the file was edited since) keeps the rows before
    iter_num, the evaluation at it and the start rows. Returns the number of lines removed."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if length is not None and length <= len(data) and (length == 0 or data[length - 1:length] == b"\n"):
        kept = data[:length]
    else:
        keep = []
        for line in data.split(b"\n"):
            row = _parse(line.decode("utf-8", "replace"))
            if isinstance(row, dict) and _is_int(row.get("iter")) and (
                    row["iter"] < iter_num or (row["iter"] == iter_num and "val_loss" in row)):
                keep.append(line + b"\n")
        kept = b"".join(keep)
    removed = len(data.splitlines()) - len(kept.splitlines())
    if kept != data:
        write_atomically(path, kept)
    return removed
