"""Run tracking in TensorBoard and Weights & Biases: the rows of metrics.jsonl, sent on to the trackers people use.

metrics.jsonl stays the record; a tracker is a copy for viewing. So a tracker that cannot start (not installed,
no network, a bad key) or that fails later costs one warning, and training goes on without it: tracking must never
stop or slow a run. The trackers' work (a few hundred microseconds a row) runs on a background thread that sends
the rows in batches, so the loop only queues each row. Only rank 0 tracks (it alone writes metrics.jsonl).
"""

from __future__ import annotations

import queue
import sys
import threading
from pathlib import Path

from gptrain.config import TrainConfig, config_to_dict
from gptrain.dpo import METRICS as DPO_METRICS
from gptrain.errors import one_line

SEND_EVERY_S = 1.0
SCALARS_OF = {"step": ("loss", "lr", "grad_norm", "update_ratio", "ms", "tokens_per_s", "mfu", "epoch", *DPO_METRICS),
              "eval": ("train_loss", "val_loss",
                       *(f"{split}_{name}" for split in ("train", "val") for name in DPO_METRICS))}


def kind_of_row(row: dict) -> str:
    return "event" if "event" in row else "eval" if "val_loss" in row else "step"


def scalars(row: dict) -> dict[str, float]:
    """A row's numbers under the names the trackers show: train/loss, eval/val_loss, ...; nulls are left out."""
    kind = kind_of_row(row)
    prefix = "train" if kind == "step" else "eval"
    return {f"{prefix}/{name}": float(row[name]) for name in SCALARS_OF.get(kind, ())
            if isinstance(row.get(name), (int, float)) and not isinstance(row.get(name), bool)}


class TensorBoardTracker:
    """Scalars by iteration, events and the start facts as text, the config as hyperparameters (text too: the
    hparams plugin needs a metric at start). A resumed run purges the steps after its checkpoint, so TensorBoard
    shows no iteration twice."""

    name = "tensorboard"

    def __init__(self, folder: Path, config: TrainConfig, resume_iter: int | None):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: gptrain[tensorboard]

        self.writer = SummaryWriter(str(folder), purge_step=resume_iter)
        if resume_iter is None:
            lines = [f"    {k}: {v}" for k, v in config_to_dict(config).items()]
            self.writer.add_text("config", "\n".join(lines), 0)

    def write(self, row: dict) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        it = row["iter"]
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(row).items()]
        if values:  # one event for the whole row: a fraction of the cost of one add_scalar per figure
            self.writer.file_writer.add_summary(Summary(value=values), it)
        if kind_of_row(row) == "event":
            text = row.get("message") or ", ".join(f"{k}: {v}" for k, v in row.items() if k not in ("iter", "event"))
            self.writer.add_text(f"events/{row['event']}", text, it)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per gptrain run: a resumed run continues it (its id is kept in the checkpoint). The iteration
    is the x axis (`iter`), so rows that a resume logs again replace nothing and break no step order.
    WANDB_MODE=offline (and the rest of W&B's environment variables) work as usual."""

    name = "wandb"

    def __init__(self, config: TrainConfig, out_dir: Path, run_id: str | None):
        import wandb  # gptrain[wandb]

        self.wandb = wandb
        # No console capture and no system-metrics sampling: on a small machine both cost the loop time (a W&B
        # process tees every printed line), and metrics.jsonl already holds what the run prints.
        quiet = wandb.Settings(console="off", x_disable_stats=True)
        self.run = wandb.init(project=config.wandb_project, name=config.wandb_run_name or out_dir.name,
                              config=config_to_dict(config), dir=str(out_dir), id=run_id,
                              resume="allow" if run_id else None, settings=quiet)
        self.run.define_metric("iter")
        self.run.define_metric("*", step_metric="iter")

    @property
    def run_id(self) -> str:
        return self.run.id

    def write(self, row: dict) -> None:
        values = scalars(row)
        if kind_of_row(row) == "event":
            if row["event"] == "start":
                self.run.summary.update({k: v for k, v in row.items() if k not in ("iter", "event")})
                return
            values = {f"events/{row['event']}": 1.0}
        if values:
            self.run.log({"iter": row["iter"], **values})

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers that started, fed from a queue by one background thread; each failure turns one of them off
    with a warning, never the run."""

    def __init__(self, trackers: list, warn=None):
        self.trackers = trackers
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.rows: queue.SimpleQueue = queue.SimpleQueue()
        self.worker = None
        self.closing = threading.Event()

    @classmethod
    def start(cls, config: TrainConfig, resume_iter: int | None, wandb_id: str | None, warn=None) -> Trackers:
        run = config.run_dir
        makers = {"tensorboard": lambda: TensorBoardTracker(Path(config.tensorboard_dir or run.tensorboard), config,
                                                            resume_iter),
                  "wandb": lambda: WandbTracker(config, run.path, wandb_id)}
        trackers = cls([], warn)
        for name in config.log_to:
            try:
                trackers.trackers.append(makers[name]())
            except ImportError:
                trackers.warn(f"{name} is not installed (pip install 'gptrain[{name}]'); training goes on, "
                              "logging to metrics.jsonl only")
            except Exception as exc:  # a tracker's own failure (no network, a bad key): never the run's
                trackers.warn(f"{name} could not start ({one_line(exc)}); training goes on without it")
        return trackers

    def ids(self) -> dict[str, str]:
        """The tracker runs' ids, saved in checkpoints so that a resume continues the same runs."""
        return {t.name: t.run_id for t in self.trackers if t.name == "wandb"}

    @staticmethod
    def saved_ids(saved) -> dict[str, str]:
        """ids() as a checkpoint holds it; anything else (a damaged checkpoint) means none."""
        if not isinstance(saved, dict):
            return {}
        return {k: v for k, v in saved.items() if isinstance(k, str) and isinstance(v, str)}

    def write(self, row: dict) -> None:
        if not self.trackers:
            return
        if self.worker is None:
            self.worker = threading.Thread(target=self._feed, name="gptrain-trackers", daemon=True)
            self.worker.start()
        self.rows.put(row)

    def _feed(self) -> None:
        """Send the queued rows once a second rather than one by one: each wake-up of this thread interrupts the
        training threads, and at log_interval 1 on a small CPU a wake-up per row cost several times more (README,
        "Tracking runs")."""
        while True:
            batch = [self.rows.get()]
            self.closing.wait(SEND_EVERY_S)
            while not self.rows.empty():
                batch.append(self.rows.get())
            for row in batch:
                if row is None:
                    return
                self._send(row)

    def _send(self, row: dict) -> None:
        for tracker in list(self.trackers):
            try:
                tracker.write(row)
            except Exception as exc:
                self.trackers.remove(tracker)
                self.warn(f"{tracker.name} failed ({one_line(exc)}) and is off for the rest of the run; "
                          "metrics.jsonl has every row")

    def close(self) -> None:
        """Send what is queued, then close each tracker."""
        if self.worker is not None:
            self.closing.set()
            self.rows.put(None)
            self.worker.join()
            self.worker = None
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:
                self.warn(f"{tracker.name} did not close cleanly ({one_line(exc)})")
        self.trackers = []
