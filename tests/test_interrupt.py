"""Runs that die: Ctrl-C, SIGTERM, kill -9 at random moments, a full disk."""

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, TINY

from gptrain import checkpoint as ckpt_io
from gptrain.cli import main, run_guarded
from gptrain.train import train


def write_config(tmp_path, dataset, **overrides):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**TINY, "dataset": str(dataset), "out_dir": str(tmp_path / "run"), **overrides}))
    return path


def start(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "gptrain", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until(proc, prefix, timeout=60.0) -> list[str]:
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
    state = ckpt_io.load_checkpoint(tmp_path / "run" / ckpt_io.LAST)
    assert state["progress"]["iter_num"] == last_logged + 1  # the step in flight finished, then it saved
    assert "--init_from=resume" in err and "Traceback" not in err
    resumed = subprocess.run([sys.executable, "-m", "gptrain", "train", str(config), "--init_from=resume",
                              f"--max_iters={last_logged + 4}"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at iter {last_logged + 1}" in resumed.stdout


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(tmp_path, char_dataset):
    # A model big enough that one step takes a second or more on a CPU.
    config = write_config(tmp_path, char_dataset, n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=32,
                          eval_iters=1, max_iters=100, lr_decay_iters=100, eval_interval=1000)
    proc = start("train", str(config))
    read_until(proc, "step 0:")
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    assert proc.poll() is None  # the first Ctrl-C waits for the step to finish
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "aborted at once" in err and "Traceback" not in err
    assert not (tmp_path / "run" / ckpt_io.LAST).exists()


@pytest.mark.slow
def test_kill_9_at_random_moments_always_resumes(tmp_path, char_dataset):
    """Fault injection: kill -9 a run at seeded random moments, ten times; every time the checkpoint left
    behind loads, and resuming continues from it; finally a resume runs to the end."""
    rng = random.Random(20261128)
    config = write_config(tmp_path, char_dataset, max_iters=100_000, lr_decay_iters=100_000, eval_interval=50,
                          checkpoint_interval=2, log_interval=10)
    checkpoint = tmp_path / "run" / ckpt_io.LAST
    iters, kills, resumes = [], 0, 0
    for _ in range(10):
        resuming = checkpoint.exists()
        proc = start("train", str(config), *(["--init_from=resume"] if resuming else []))
        time.sleep(rng.uniform(1.0, 4.0))  # start-up takes 1-2 s: some kills land before training begins
        proc.kill()
        out, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err
        kills += 1
        if "resuming from" in out:
            assert f"at iter {iters[-1]}" in out  # it continued from the checkpoint left by the last kill
            resumes += 1
        if checkpoint.exists():
            state = ckpt_io.load_checkpoint(checkpoint)  # never torn, whenever the kill came
            assert not iters or state["progress"]["iter_num"] >= iters[-1]
            iters.append(state["progress"]["iter_num"])
    assert kills == 10 and resumes >= 5 and iters[-1] > 0
    end = iters[-1] + 10
    final = subprocess.run([sys.executable, "-m", "gptrain", "train", str(config), "--init_from=resume",
                            f"--max_iters={end}"], cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert ckpt_io.load_checkpoint(checkpoint)["progress"]["iter_num"] == end
    print(f"fault injection: {kills} kills, {resumes} resumes from the checkpoint, iterations {iters}")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, char_dataset, monkeypatch, capsys):
    config = write_config(tmp_path, char_dataset, max_iters=4, eval_interval=2)
    assert run_guarded(main, ["train", str(config)]) == 0
    checkpoint = tmp_path / "run" / ckpt_io.LAST
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
