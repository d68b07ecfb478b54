"""Run tracking in TensorBoard and Weights & Biases: the rows of metrics.jsonl, sent on to the trackers people use.

metrics.jsonl stays the record; a tracker is a copy for viewing. So a tracker that cannot start (not installed,
no network, a bad key) or that fails later costs one warning, and training goes on without it: tracking must never
stop or slow a run. The trackers live in a process of their own (`python -m gptrain.monitor.trackers`), at Linux's
idle CPU priority, and the training loop only hands it the queued rows once a second: their Python work (a few
hundred microseconds a row) then never holds the training process's GIL, and their threads never take a core
from training. Only rank 0 tracks (it alone writes metrics.jsonl).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gptrain.config import TrainConfig, build_config, config_to_dict
from gptrain.errors import one_line

SEND_EVERY_S = 1.0
SCALARS_OF = {"step": ("loss", "lr", "grad_norm", "update_ratio", "ms", "tokens_per_s", "mfu", "epoch"),
              "eval": ("train_loss", "val_loss")}


def kind_of_row(row: dict) -> str:
    return "event" if "event" in row else "eval" if "val_loss" in row else "step"


def scalars(row: dict) -> dict[str, float]:
    """A row's numbers under the names the trackers show: train/loss, eval/val_loss, ...; nulls are left out."""
    kind = kind_of_row(row)
    prefix = "train" if kind == "step" else "eval"
    return {f"{prefix}/{name}": float(row[name]) for name in SCALARS_OF.get(kind, ())
            if isinstance(row.get(name), (int, float)) and not isinstance(row.get(name), bool)}


def yield_cpu_to_training() -> None:
    """Put the calling thread in Linux's SCHED_IDLE class: it runs only on a core that nothing else wants and never
    preempts a training thread; the threads and processes it starts (TensorBoard's writer, W&B's threads and its
    service process) inherit the class. Elsewhere, and where it is not allowed, it does nothing."""
    if sys.platform.startswith("linux"):
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        except (OSError, AttributeError):
            pass


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


# The modules each tracker needs, as `pip install 'gptrain[NAME]'` installs them.
NEEDS = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}


def installed(name: str) -> bool:
    """Whether the tracker's modules can be imported (found without importing them)."""
    try:
        return all(importlib.util.find_spec(module) is not None for module in NEEDS[name])
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def not_installed(name: str) -> str:
    return f"{name} is not installed (pip install 'gptrain[{name}]'); training goes on, logging to metrics.jsonl only"


def start_trackers(config: TrainConfig, resume_iter: int | None, wandb_id: str | None) -> tuple[list, list[str]]:
    """The trackers of config.log_to that could start, and a warning for each that could not."""
    out_dir = Path(config.out_dir)
    makers = {"tensorboard": lambda: TensorBoardTracker(Path(config.tensorboard_dir or out_dir / "tb"), config,
                                                        resume_iter),
              "wandb": lambda: WandbTracker(config, out_dir, wandb_id)}
    started, warnings = [], []
    for name in config.log_to:
        try:
            started.append(makers[name]())
        except ImportError:
            warnings.append(not_installed(name))
        except Exception as exc:  # a tracker's own failure (no network, a bad key): never the run's
            warnings.append(f"{name} could not start ({one_line(exc)}); training goes on without it")
    return started, warnings


def send(trackers: list, row: dict) -> None:
    """One row to each tracker; one that fails is warned about once and dropped."""
    for tracker in list(trackers):
        try:
            tracker.write(row)
        except Exception as exc:
            trackers.remove(tracker)
            print(f"warning: {tracker.name} failed ({one_line(exc)}) and is off for the rest of the run; "
                  "metrics.jsonl has every row", file=sys.stderr, flush=True)


def close_all(trackers: list) -> None:
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as exc:
            print(f"warning: {tracker.name} did not close cleanly ({one_line(exc)})", file=sys.stderr, flush=True)


def tracker_process() -> None:
    """The trackers' process. stdin: a first line {"config", "resume_iter", "wandb_id"}, then one row per line
    until end of file (training closed it, or ended). It answers on stdout with one line, {"ids", "warnings"}, once
    the trackers have started; everything else it (or a tracker) prints goes to stderr."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: training decides
    yield_cpu_to_training()
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stdout is the answer channel alone: W&B's and TensorBoard's prints go to stderr
    sys.stdout = sys.stderr
    start = json.loads(sys.stdin.readline())
    trackers, warnings = start_trackers(build_config(start["config"]), start["resume_iter"], start["wandb_id"])
    ids = {t.name: t.run_id for t in trackers if t.name == "wandb"}
    answer.write(json.dumps({"ids": ids, "warnings": warnings}) + "\n")
    answer.close()
    for line in sys.stdin:
        send(trackers, json.loads(line))
    close_all(trackers)


def read_answer(stdout) -> dict:
    """The trackers' process's answer: the first line that is a JSON object with "ids" (a line that something
    printed at start-up before the answer channel was set apart is passed over). ValueError if none came."""
    for line in stdout:
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        if isinstance(answer, dict) and "ids" in answer:
            stdout.close()
            return answer
    raise ValueError("the trackers' process ended without answering")


class Trackers:
    """The training side: starts the trackers' process, queues the rows and hands them over once a second, without
    ever waiting for it (a full pipe keeps the rows for the next second). A process that dies costs one warning."""

    def __init__(self, process: subprocess.Popen | None = None, run_ids: dict | None = None, warn=None):
        self.process, self.run_ids = process, run_ids or {}
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.pending, self.last_sent = bytearray(), time.monotonic()

    @classmethod
    def start(cls, config: TrainConfig, resume_iter: int | None, wandb_id: str | None, warn=None) -> Trackers:
        trackers = cls(warn=warn)
        log_to = []
        for name in config.log_to:  # what this process cannot import is not asked of the trackers' process
            if installed(name):
                log_to.append(name)
            else:
                trackers.warn(not_installed(name))
        if not log_to:
            return trackers
        process = subprocess.Popen([sys.executable, "-m", "gptrain.monitor.trackers"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE)
        start = {"config": {**config_to_dict(config), "log_to": log_to}, "resume_iter": resume_iter,
                 "wandb_id": wandb_id}
        try:
            process.stdin.write((json.dumps(start) + "\n").encode())
            process.stdin.flush()
            answer = read_answer(process.stdout)
        except (OSError, ValueError):
            process.kill()
            process.wait()
            trackers.warn("the trackers could not start (their process ended; its error is above); training goes "
                          "on, logging to metrics.jsonl only")
            return trackers
        for message in answer["warnings"]:
            trackers.warn(message)
        os.set_blocking(process.stdin.fileno(), False)
        trackers.process, trackers.run_ids = process, answer["ids"]
        return trackers

    def ids(self) -> dict[str, str]:
        """The tracker runs' ids, saved in checkpoints so that a resume continues the same runs."""
        return dict(self.run_ids)

    @staticmethod
    def saved_ids(saved) -> dict[str, str]:
        """ids() as a checkpoint holds it; anything else (an older or damaged checkpoint) means none."""
        if not isinstance(saved, dict):
            return {}
        return {k: v for k, v in saved.items() if isinstance(k, str) and isinstance(v, str)}

    def write(self, row: dict) -> None:
        if self.process is None:
            return
        self.pending += (json.dumps(row) + "\n").encode()
        if time.monotonic() - self.last_sent >= SEND_EVERY_S:
            self._hand_over()

    def _hand_over(self) -> None:
        """Write what the pipe takes now; the rest waits for the next call."""
        self.last_sent = time.monotonic()
        try:
            written = os.write(self.process.stdin.fileno(), self.pending)
        except BlockingIOError:
            return
        except OSError as exc:  # the process died: a broken pipe
            self._lost(exc)
            return
        del self.pending[:written]

    def _lost(self, exc: OSError) -> None:
        self.warn(f"the trackers' process ended ({one_line(exc)}); they are off for the rest of the run, and "
                  "metrics.jsonl has every row")
        self.process.kill()
        self.process.wait()
        self.process = None

    def close(self) -> None:
        """Hand over what is queued and wait for the trackers to send it and close."""
        if self.process is None:
            return
        os.set_blocking(self.process.stdin.fileno(), True)
        try:
            self.process.stdin.write(bytes(self.pending))
            self.process.stdin.close()
        except OSError as exc:
            self._lost(exc)
            return
        self.process.wait()
        self.process = None


if __name__ == "__main__":
    tracker_process()
