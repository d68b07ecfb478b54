"""Run tracking with the real libraries, offline: TensorBoard's event files read back with tensorboard's own
EventAccumulator, and W&B's offline run file read back record by record, both compared with metrics.jsonl."""

import json
import struct
import sys
from pathlib import Path

import pytest
from conftest import metrics_rows

from gptrain.train import Trainer, train

pytest.importorskip("tensorboard")  # both are in the dev extra, so CI runs these tests
pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()  # purges the steps a resumed writer declared stale, as TensorBoard itself does
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_history(run_dir) -> list[dict]:
    """The history rows of a W&B offline run, from its transaction log: a LevelDB-style log (32 KiB blocks of
    records, each with a 7-byte header: crc32, length, type) of protobuf Records (wandb.proto)."""
    from wandb.proto.wandb_internal_pb2 import Record

    (log,) = run_dir.glob("run-*.wandb")
    data, block, full, first, last = log.read_bytes(), 32768, 1, 2, 4
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0:
            break
        pending = (b"" if kind in (full, first) else pending) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (full, last):
            records.append(Record.FromString(pending))
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_tensorboard_holds_the_rows_of_metrics_jsonl(tiny_config, tmp_path):
    train(tiny_config(max_iters=10, eval_interval=5, log_to=["tensorboard"]))
    rows = metrics_rows(tmp_path / "run")
    scalars = tensorboard_scalars(tmp_path / "run" / "tb")
    losses = {r["iter"]: r["loss"] for r in rows if "loss" in r}
    assert scalars["train/loss"] == pytest.approx(losses, rel=1e-6)  # TensorBoard keeps float32
    assert scalars["eval/val_loss"] == pytest.approx({r["iter"]: r["val_loss"] for r in rows if "val_loss" in r},
                                                     rel=1e-6)
    assert set(scalars["train/lr"]) == set(losses) and set(scalars["train/update_ratio"]) == {0}


def test_a_resumed_run_shows_each_iteration_once_in_tensorboard(tiny_config, tmp_path, monkeypatch):
    config = tiny_config(max_iters=12, eval_interval=4, log_to=["tensorboard"])
    original = Trainer.train_step

    def crash_at_iter_6(self, *args, **kwargs):
        if self.loop.iter_num == 6:
            raise RuntimeError("a crash after the checkpoint at iter 4")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", crash_at_iter_6)
    with pytest.raises(RuntimeError):
        train(config)
    monkeypatch.setattr(Trainer, "train_step", original)
    train(tiny_config(max_iters=12, eval_interval=4, log_to=["tensorboard"], init_from="resume"))
    steps = tensorboard_scalars(tmp_path / "run" / "tb")["train/loss"]
    losses = {r["iter"]: r["loss"] for r in metrics_rows(tmp_path / "run") if "loss" in r}
    assert sorted(steps) == list(range(12)) and steps == pytest.approx(losses, rel=1e-6)


def test_wandb_offline_run_holds_the_history_and_a_resume_continues_it(tiny_config, tmp_path):
    train(tiny_config(max_iters=6, eval_interval=3, log_to="wandb", wandb_project="tests"))
    train(tiny_config(max_iters=9, eval_interval=3, log_to="wandb", wandb_project="tests", init_from="resume"))
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    ids = {log.stem.removeprefix("run-") for run in runs for log in run.glob("run-*.wandb")}
    assert len(runs) == 2 and len(ids) == 1  # one W&B id, continued (the folder names may differ by a suffix)
    history = [row for run in runs for row in wandb_history(run)]
    logged = {row["iter"]: row["train/loss"] for row in history if "train/loss" in row}
    losses = {r["iter"]: r["loss"] for r in metrics_rows(tmp_path / "run") if "loss" in r}
    assert logged == pytest.approx(losses, rel=1e-9) and sorted(logged) == list(range(9))
    evals = {row["iter"]: row["eval/val_loss"] for row in history if "eval/val_loss" in row}
    assert evals == pytest.approx({r["iter"]: r["val_loss"] for r in metrics_rows(tmp_path / "run")
                                   if "val_loss" in r})


def test_a_tracker_that_cannot_start_or_whose_process_dies_never_stops_training(tiny_config, tmp_path,
                                                                                monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    original = Trainer.train_step

    def kill_the_trackers_at_iter_3(self, *args, **kwargs):
        if self.loop.iter_num == 3:
            self.trackers.process.kill()
            self.trackers.process.wait()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", kill_the_trackers_at_iter_3)
    train(tiny_config(max_iters=6, eval_interval=3, log_to=["tensorboard", "wandb"]))
    err = capsys.readouterr().err
    assert "warning: wandb is not installed (pip install 'gptrain[wandb]')" in err
    assert err.count("the trackers' process ended") == 1
    assert len([r for r in metrics_rows(tmp_path / "run") if "loss" in r]) == 6  # metrics.jsonl has every row


def test_the_trackers_process_warns_about_what_it_cannot_import(tiny_config, monkeypatch):
    from gptrain.monitor.trackers import start_trackers

    monkeypatch.setitem(sys.modules, "wandb", None)
    started, warnings = start_trackers(tiny_config(log_to=["wandb"]), None, None)
    assert started == [] and warnings == ["wandb is not installed (pip install 'gptrain[wandb]'); training goes on, "
                                          "logging to metrics.jsonl only"]


def test_a_tracker_that_fails_is_dropped_with_one_warning(capsys):
    from gptrain.monitor.trackers import send

    class Broken:
        name = "tensorboard"

        def write(self, row):
            raise OSError("disk quota exceeded")

    class Working:
        name = "wandb"
        rows = []

        def write(self, row):
            self.rows.append(row)

    trackers = [Broken(), Working()]
    for it in range(3):
        send(trackers, {"iter": it, "loss": 1.0})
    err = capsys.readouterr().err
    assert err.count("tensorboard failed (disk quota exceeded) and is off for the rest of the run") == 1
    assert [t.name for t in trackers] == ["wandb"] and [r["iter"] for r in Working.rows] == [0, 1, 2]


def test_log_to_is_checked_like_every_key(tiny_config):
    from gptrain.errors import UserError

    assert tiny_config(log_to="tensorboard").log_to == ["tensorboard"]
    assert tiny_config(log_to=["wandb", "wandb"]).log_to == ["wandb"]
    with pytest.raises(UserError, match="log_to must be one of tensorboard, wandb; got 'mlflow'"):
        tiny_config(log_to=["mlflow"])
    with pytest.raises(UserError, match="log_to must be a list"):
        tiny_config(log_to=3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_the_trackers_run_in_their_own_process_at_idle_priority(tiny_config):
    """The trackers' process, every thread in it (TensorBoard's writer, W&B's) and W&B's service process run in
    SCHED_IDLE, so they never take a core from training; the training process keeps its own class."""
    import os
    import threading

    from gptrain.monitor.trackers import Trackers

    trackers = Trackers.start(tiny_config(log_to=["tensorboard", "wandb"]), None, None)
    try:
        trackers.write({"iter": 0, "loss": 1.0})
        pid = trackers.process.pid
        service = [child for child in children(pid) if read(f"/proc/{child}/comm") == "wandb-core"]
        assert len(service) == 1 and trackers.ids()["wandb"]
        for process in (pid, *service):
            policies = {read(f"{task}/stat").split()[40] for task in Path(f"/proc/{process}/task").iterdir()}
            assert policies == {str(os.SCHED_IDLE)}, (process, policies)
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER
    finally:
        trackers.close()
    assert trackers.process is None


def read(path) -> str:
    return Path(path).read_text().strip()


def children(pid: int) -> set[int]:
    return {int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()}


def test_the_answer_of_the_trackers_process_is_found_past_stray_lines():
    import io

    from gptrain.monitor.trackers import read_answer

    printed = io.BytesIO(b"a banner some library printed\n[1, 2]\n{\"ids\": {\"wandb\": \"abc\"}, \"warnings\": []}\n")
    assert read_answer(printed) == {"ids": {"wandb": "abc"}, "warnings": []}
    with pytest.raises(ValueError, match="ended without answering"):
        read_answer(io.BytesIO(b"Traceback (most recent call last):\n"))
