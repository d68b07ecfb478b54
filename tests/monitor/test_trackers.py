"""Run tracking with the real libraries, offline: TensorBoard's event files read back with tensorboard's own
EventAccumulator, and W&B's offline run file read back record by record, both compared with metrics.jsonl."""

import json
import struct
import sys

import pytest
from conftest import metrics_rows

from gptrain.monitor.trackers import TensorBoardTracker
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


def test_a_tracker_that_cannot_start_or_fails_never_stops_training(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed

    def broken_write(self, row):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(TensorBoardTracker, "write", broken_write)
    train(tiny_config(max_iters=6, eval_interval=3, log_to=["tensorboard", "wandb"]))
    err = capsys.readouterr().err
    assert "warning: wandb is not installed (pip install 'gptrain[wandb]')" in err
    assert err.count("tensorboard failed (disk quota exceeded) and is off for the rest of the run") == 1
    assert len([r for r in metrics_rows(tmp_path / "run") if "loss" in r]) == 6  # metrics.jsonl has every row


def test_log_to_is_checked_like_every_key(tiny_config):
    from gptrain.errors import UserError

    assert tiny_config(log_to="tensorboard").log_to == ["tensorboard"]
    assert tiny_config(log_to=["wandb", "wandb"]).log_to == ["wandb"]
    with pytest.raises(UserError, match="log_to must be one of tensorboard, wandb; got 'mlflow'"):
        tiny_config(log_to=["mlflow"])
    with pytest.raises(UserError, match="log_to must be a list"):
        tiny_config(log_to=3)


def test_a_tracker_whose_folder_cannot_be_made_warns_and_training_goes_on(tiny_config, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way of the event folder")
    train(tiny_config(max_iters=4, eval_interval=2, log_to=["tensorboard"], tensorboard_dir=str(blocker / "tb")))
    err = capsys.readouterr().err
    assert err.count("warning: tensorboard could not start (") == 1 and "training goes on without it" in err
    assert len([r for r in metrics_rows(tmp_path / "run") if "loss" in r]) == 4
