"""Shared fixtures: a small character dataset cut from the shipped Tiny Shakespeare, and tiny configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gptrain.config import build_config
from gptrain.data.prepare import prepare_dataset

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT / "gptrain" / "assets" / "tinyshakespeare.txt"

# A model small enough that a few dozen steps take a second or two on two cores.
TINY = dict(
    n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.0, bias=True,
    learning_rate=1e-2, min_lr=1e-3, warmup_iters=5, max_iters=40, lr_decay_iters=40,
    eval_interval=20, eval_iters=4, log_interval=1, device="cpu", dtype="float32", compile=False,
)


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")


def prepare_text(text: str, folder: Path, tokenizer: str = "char", **options) -> dict:
    """Prepare a dataset from a string, the way scripts/prepare_text.py prepares a file."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "input.txt"
    source.write_text(text, encoding="utf-8")
    return prepare_dataset([source], folder, tokenizer, **options)


@pytest.fixture(scope="session")
def char_dataset(tmp_path_factory, shakespeare_text) -> Path:
    """The first 200k characters of Tiny Shakespeare, prepared at character level."""
    folder = tmp_path_factory.mktemp("data") / "tiny_char"
    prepare_text(shakespeare_text[:200_000], folder)
    return folder


@pytest.fixture
def tiny_config(char_dataset, tmp_path):
    def make(**overrides):
        return build_config({**TINY, "dataset": str(char_dataset), "out_dir": str(tmp_path / "run"), **overrides})

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, char_dataset) -> Path:
    """A tiny model trained for 4 steps, for the tests that only read a finished run (sample, plot, export).
    They must not change it."""
    from gptrain.train import train

    folder = tmp_path_factory.mktemp("trained") / "run"
    train(build_config({**TINY, "dataset": str(char_dataset), "out_dir": str(folder), "max_iters": 4,
                        "eval_interval": 4}))
    return folder


def step_with_a_nan_gradient(trainer) -> None:
    """One optimizer step of a Trainer whose gradients hold a NaN, through gptrain's own skip logic."""
    import torch

    from gptrain.optim.step import grad_norms, skipping_nonfinite

    x, y = trainer.train_batches.next_batch()
    trainer.model(x, y)[1].backward()
    trainer.params[3].grad[0] = float("nan")
    norm, _ = grad_norms(trainer.params, sharded=False)
    with skipping_nonfinite(trainer.optimizer, trainer.scaler, ~torch.isfinite(norm), trainer.host_decides) as skip:
        if not skip:
            trainer.scaler.step(trainer.optimizer)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `python -m gptrain ARGS` (or a script, when args[0] ends with .py) in a fresh process."""
    command = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", "gptrain", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def load_script(name: str):
    """A script of scripts/ as a module, so a test calls its main() in-process (through run_guarded)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory, shakespeare_text) -> Path:
    """A model far too big for 600 characters of text: val loss turns up while train loss keeps falling."""
    from gptrain.train import train

    root = tmp_path_factory.mktemp("overfit")
    prepare_text(shakespeare_text[:600], root / "data")
    train(build_config({
        **TINY, "dataset": str(root / "data"), "out_dir": str(root / "run"), "n_embd": 64, "block_size": 16,
        "learning_rate": 3e-3, "min_lr": 3e-4, "max_iters": 150, "lr_decay_iters": 150, "eval_interval": 15,
        "log_interval": 5,
    }))
    return root / "run"


def write_config(tmp_path: Path, dataset: Path, **overrides) -> Path:
    """A YAML config file of the tiny model on `dataset`, training into tmp_path/run."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "dataset": str(dataset), "out_dir": str(tmp_path / "run"), **overrides}))
    return path


def metrics_rows(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl (each line must be whole)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in metrics_rows(run_dir) if r.get("event") == kind]


@pytest.fixture(scope="session")
def chat_dataset(tmp_path_factory) -> Path:
    """A chat dataset of the demonstration's arithmetic conversations (tests/chat_data.py)."""
    from chat_data import prepare_chats

    return prepare_chats(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory, chat_dataset) -> Path:
    """A plain character dataset whose vocabulary is exactly chat_dataset's base one: a model trained on it
    fine-tunes on chat_dataset, gaining the chat tokens."""
    from chat_data import contents

    folder = tmp_path_factory.mktemp("chat_base") / "data"
    prepare_text(contents(chat_dataset.parent / "chats.jsonl"), folder)
    return folder


# ----- the inputs of every command that publishes a set of files (tests/writers.py) ------------------------


@pytest.fixture(scope="session")
def writer_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    (root / "a.txt").write_text(text[:30_000])
    (root / "b.txt").write_text(text[30_000:50_000])
    chats = [{"messages": [{"role": "user", "content": f"what is {i} and {i}?"},
                           {"role": "assistant", "content": f"{i} and {i} is {2 * i}."}]} for i in range(60)]
    (root / "chats.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    return root


@pytest.fixture(scope="session")
def writer_models(tmp_path_factory, char_dataset, trained_run):
    """A Hugging Face folder to import, and a LoRA run on trained_run to merge."""
    import torch
    import transformers

    from gptrain.cli import main, run_guarded

    root = tmp_path_factory.mktemp("models")
    config = transformers.GPT2Config(vocab_size=65, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    from hf_tokenizers import save_with_tokenizer

    save_with_tokenizer(transformers.GPT2LMHeadModel(config), root / "hf")
    lora = write_config(root, char_dataset, out_dir=str(root / "lora"), init_from=f"from:{trained_run}",
                        lora_rank=2, max_iters=2, eval_interval=2, eval_iters=1)
    assert run_guarded(main, ["train", str(lora)]) == 0
    return root


def first_step_gradients(trainer) -> list[torch.Tensor]:
    """The gradients train_step hands to the optimizer (clipping off)."""
    captured = []
    step = trainer.optimizer.step

    def capture(*args, **kwargs):
        captured.extend(p.grad.clone() for p in trainer.params)
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    trainer.train_step()
    return captured
