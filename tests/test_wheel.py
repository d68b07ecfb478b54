"""The product, not the checkout: the wheel built from this tree, installed into a fresh virtual environment outside
it, runs the quick start from an empty folder (prepare Tiny Shakespeare, train a shipped config by name, sample)
with nothing of the checkout on its path. torch comes from TORCH_SPEC (the Makefile passes its own)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def run(command: list[str], cwd: Path, env: dict, timeout: float = 600) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_the_wheel_runs_the_quick_start_outside_the_checkout(tmp_path):
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "empty"
    work.mkdir()
    # Bytecode is written as modules are first imported (not compiled for all of torch's files at install).
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE")}
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
         str(dist), str(ROOT)], tmp_path, env)
    wheel = next(dist.glob("gptrain-*.whl"))
    # The environment gets no pip of its own: this pip installs into it (--python), as it would into a user's.
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python, gptrain = venv / "bin" / "python", venv / "bin" / "gptrain"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile"]
    run([*pip, *shlex.split(os.environ.get("TORCH_SPEC", "torch==2.13.0"))], work, env)
    run([*pip, str(wheel)], work, env)

    where = run([str(python), "-c", "import gptrain; print(gptrain.__file__)"], work, env)
    assert str(venv) in where and str(ROOT) not in where  # the installed package, not the checkout
    assert "gptrain 0." in run([str(gptrain), "--version"], work, env)
    assert "shakespeare_char_cpu" in run([str(gptrain), "configs"], work, env)
    prepared = run([str(gptrain), "prepare", "shakespeare"], work, env)
    assert "1,115,394 characters" in prepared and (work / "data" / "shakespeare_char" / "train.bin").is_file()
    run([str(gptrain), "train", "shakespeare_char_cpu", "--max_iters=4", "--eval_interval=4", "--eval_iters=2",
         "--log_interval=2", "--compile=false"], work, env)
    assert (work / "out" / "shakespeare_char_cpu" / "ckpt_best.pt").is_file()
    text = run([str(gptrain), "sample", "--ckpt", "out/shakespeare_char_cpu", "--num_samples", "1",
                "--max_new_tokens", "40", "--start", "ROMEO:"], work, env)
    assert text.startswith("ROMEO:") and len(text) > 40
    run([str(gptrain), "configs", "copy", "shakespeare_char_cpu", "mine.yaml"], work, env)
    assert (work / "mine.yaml").read_text().startswith("#")
