"""Runs that die: Ctrl-C, SIGTERM, kill -9 at random moments, a full disk."""

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, write_config

from gptrain import checkpoint as ckpt_io
from gptrain.cli import main, run_guarded
from gptrain.monitor.metrics import read_metrics
from gptrain.train import train


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """A failing test must not leave its training process running (and loading the machine) after it."""
    yield
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    STARTED.clear()


STARTED: list[subprocess.Popen] = []


def start(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gptrain", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    STARTED.append(proc)
    return proc


def read_until(proc, prefix, timeout=180.0) -> list[str]:
    """stdout lines up to and including the first that starts with prefix."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting with {prefix!r} in {lines[-5:]}")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_saves_and_says_how_to_resume(tmp_path, char_dataset, sig, code):
    config = write_config(tmp_path, char_dataset, max_iters=100_000, lr_decay_iters=100_000, eval_interval=100_000)
    proc = start("train", str(config))
    seen = read_until(proc, "iter 20:")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = seen + out.splitlines()
    last_logged = max(int(line.split(":")[0].split()[1]) for line in lines if line.startswith("iter "))
    state = ckpt_io.load_checkpoint(tmp_path / "run" / ckpt_io.CKPT_LAST)
    assert state["progress"]["iter_num"] == last_logged + 1  # the step in flight finished, then it saved
    assert "--init_from=resume" in err and "Traceback" not in err
    resumed = subprocess.run([sys.executable, "-m", "gptrain", "train", str(config), "--init_from=resume",
                              f"--max_iters={last_logged + 4}"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at iter {last_logged + 1}" in resumed.stdout


def read_stderr_until(proc, fragment, timeout=120.0) -> str:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        if fragment in line:
            return seen
    raise AssertionError(f"no stderr line with {fragment!r}; got {seen[-500:]!r}")


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(tmp_path, char_dataset):
    # Micro-batches big enough that one takes a second or more on a CPU: the second signal, sent as soon as the
    # first is acknowledged, lands inside the same micro-batch (events, not sleeps, order the signals).
    config = write_config(tmp_path, char_dataset, n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16,
                          gradient_accumulation_steps=4, eval_iters=1, max_iters=100, lr_decay_iters=100,
                          eval_interval=1000)
    proc = start("train", str(config))
    read_until(proc, "step 0:")  # the first step starts right after this line
    proc.send_signal(signal.SIGINT)
    read_stderr_until(proc, "send it again to abort at once")
    assert proc.poll() is None  # the first Ctrl-C waits for the micro-batch to finish
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "aborted at once" in err and "Traceback" not in err
    assert not (tmp_path / "run" / ckpt_io.CKPT_LAST).exists()


@pytest.mark.slow
def test_a_long_evaluation_is_abandoned_at_the_first_signal(tmp_path, char_dataset):
    """An evaluation that would take minutes (here 2 x 200,000 batches) ends at once on SIGTERM."""
    config = write_config(tmp_path, char_dataset, eval_iters=200_000)
    proc = start("train", str(config))
    read_until(proc, "model:")  # printed just before the loop, which starts with the iteration-0 evaluation
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)  # the whole evaluation would take several minutes
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM at iter 0" in err and "Traceback" not in err
    assert "step 0:" not in out  # the evaluation was abandoned, not finished
    assert ckpt_io.load_checkpoint(tmp_path / "run" / ckpt_io.CKPT_LAST)["progress"]["iter_num"] == 0


class Lines:
    """A process's stdout, read by a thread into a list, so the test can wait on files without the pipe filling."""

    def __init__(self, proc):
        self.lines = []
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        self.thread.join(timeout=30)
        return "".join(self.lines)


def wait_for(condition, what: str, timeout: float = 120.0, interval: float = 0.0002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def inode(path):
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def modified(path):
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


KILL_MOMENTS = ("after_checkpoints", "during_write", "during_eval")


def kill_schedule(rng: random.Random, attempts: int) -> list[tuple[str, int]]:
    """Seeded random moments, each defined by an event of the run rather than by the clock: after the k-th new
    checkpoint, while a checkpoint is being written, or at the start of an evaluation. The first kill comes after
    a checkpoint (so there is one to resume from); the rest are the kinds in turn, shuffled, so every kind is hit."""
    kinds = [KILL_MOMENTS[i % len(KILL_MOMENTS)] for i in range(attempts - 1)]
    return [(kind, rng.randint(1, 4)) for kind in ["after_checkpoints", *rng.sample(kinds, len(kinds))]]


def wait_for_moment(kind, k, run_dir, lines, eval_interval):
    checkpoint, tmp = run_dir / ckpt_io.CKPT_LAST, run_dir / f".{ckpt_io.CKPT_LAST}.tmp"
    if kind == "after_checkpoints":
        seen = [inode(checkpoint)]

        def k_new_checkpoints():
            current = inode(checkpoint)
            if current is not None and current != seen[-1]:  # os.replace publishes a new file each time
                seen.append(current)
            return len(seen) > k
        wait_for(k_new_checkpoints, f"{k} new checkpoints")
    elif kind == "during_write":
        torn = modified(tmp)  # a write torn by the previous kill leaves its file behind: wait for a new one
        wait_for(lambda: modified(tmp) not in (None, torn), "a checkpoint write in progress")
    else:
        def eval_starts():  # the log line of the iteration just before an evaluation
            return any(line.startswith("iter ") and (int(line.split()[1].rstrip(":")) + 1) % eval_interval == 0
                       for line in lines.lines[-3:])
        wait_for(eval_starts, "an evaluation", interval=0.001)


@pytest.mark.slow
def test_kill_9_at_random_moments_always_resumes(tmp_path, char_dataset):
    """Fault injection: kill -9 a run at four seeded random moments (every kind at least once), each chosen by an
    event of the run (so the machine's speed cannot move it before training starts); every time the checkpoint left
    behind loads and the next run resumes from it; finally a resume runs to the end."""
    rng = random.Random(20261129)
    eval_interval = 10
    config = write_config(tmp_path, char_dataset, max_iters=100_000, lr_decay_iters=100_000,
                          eval_interval=eval_interval, eval_iters=20, checkpoint_interval=3, log_interval=1)
    run_dir = tmp_path / "run"
    checkpoint = run_dir / ckpt_io.CKPT_LAST
    iters, moments, resumes = [], [], 0
    for kind, k in kill_schedule(rng, 4):
        resuming = checkpoint.exists()
        proc = start("train", str(config), "--init_from=resume" if resuming else "--overwrite")
        lines = Lines(proc)
        wait_for_moment(kind, k, run_dir, lines, eval_interval)
        proc.kill()
        err = proc.communicate()[1]
        out = lines.text()
        assert proc.returncode == -signal.SIGKILL, err
        moments.append(kind)
        if resuming:
            assert f"resuming from {checkpoint} at iter {iters[-1]}" in out, out[-500:]
            resumes += 1
        assert checkpoint.exists()
        state = ckpt_io.load_checkpoint(checkpoint)  # never torn, whenever the kill came
        assert not iters or state["progress"]["iter_num"] >= iters[-1]
        iters.append(state["progress"]["iter_num"])
    assert resumes == 3 and set(moments) == set(KILL_MOMENTS)
    end = iters[-1] + 10
    final = subprocess.run([sys.executable, "-m", "gptrain", "train", str(config), "--init_from=resume",
                            f"--max_iters={end}"], cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert ckpt_io.load_checkpoint(checkpoint)["progress"]["iter_num"] == end
    steps = [r["iter"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(end))  # every iteration logged once, whatever the kills tore
    print(f"fault injection: moments {moments}, checkpoints at iterations {iters}")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, char_dataset, monkeypatch, capsys):
    config = write_config(tmp_path, char_dataset, max_iters=4, eval_interval=2)
    assert run_guarded(main, ["train", str(config)]) == 0
    checkpoint = tmp_path / "run" / ckpt_io.CKPT_LAST
    before = checkpoint.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial checkpoint bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_io.torch, "save", full_disk)
    code = run_guarded(main, ["train", str(config), "--init_from=resume", "--max_iters=8"])
    err = capsys.readouterr().err
    assert code == 1
    assert "No space left on device" in err and "previous checkpoint is intact" in err
    assert checkpoint.read_bytes() == before
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_stale_temporary_files_are_removed(tiny_config, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".ckpt_last.pt.tmp").write_bytes(b"half a checkpoint from a killed process")
    train(tiny_config(max_iters=2, eval_interval=2))
    assert not (tmp_path / "run" / ".ckpt_last.pt.tmp").exists()
