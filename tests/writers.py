"""The commands that publish a set of files, as the kill and signal tests run them: each with the arguments of an
old set and a new one into the same target, run in a forked child so that a kill -9 or a signal ends only it."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from conftest import load_script, write_config

from gptrain import checkpoint as ckpt_io
from gptrain.cli import main, run_guarded
from gptrain.runtime import names, publish
from gptrain.runtime.publish import KILL_VARIABLE


def user_files(folder: Path) -> None:
    """What a user keeps beside gptrain's output: a file, a folder of files, a link."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "mine").mkdir()
    (folder / "mine" / "deep.txt").write_text("deeper")
    (folder / "link").symlink_to("notes.txt")


def assert_user_files(folder: Path) -> None:
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "mine" / "deep.txt").read_text() == "deeper"
    assert os.readlink(folder / "link") == "notes.txt"


def no_leftovers(target: Path) -> bool:
    beside = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    inside = [p.name for p in target.iterdir() if p.name.endswith(".tmp")] if target.is_dir() else []
    return not beside and not inside


def unsupported_exchange(first, second):
    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


def run_forked(entry, argv: list[str], log: Path, kill_at: str | None = None, two_renames: bool = False,
               before=None) -> int:
    """entry(argv) through run_guarded in a forked child (a kill -9 ends only it); its exit code, or -signal.
    Its output goes to `log`; `before`, if given, is called in the child first."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 70
        try:
            sys.stdout = sys.stderr = open(log, "a", buffering=1)
            if kill_at:
                os.environ[KILL_VARIABLE] = kill_at
            if two_renames:
                publish.exchange = unsupported_exchange
            if before is not None:
                before()
            code = run_guarded(entry, argv)
            left = multiprocessing.active_children()
            if left:  # a command must end the processes it started, however it ends
                print(f"left running: {left}", file=sys.stderr)
                code = 99
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def digest(path: Path) -> str:
    """What a file of the set holds, leaving out what differs between two runs of one command: a checkpoint's
    paths and a tokenizer's training time."""
    if path.suffix == ".pt":
        state = ckpt_io.load_checkpoint(path)
        weights = b"".join(t.numpy().tobytes() for _, t in sorted(state["model"].items()))
        return hashlib.sha256(weights + json.dumps(state["model_config"], sort_keys=True).encode()).hexdigest()
    if path.name == "training.json":
        info = json.loads(path.read_text())
        info.pop("seconds")
        return json.dumps(info, sort_keys=True)
    if path.is_dir():
        return "folder"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def contents(target: Path) -> dict[str, str]:
    """The set of gptrain files the target holds."""
    if not target.is_dir():
        return {}
    return {name: digest(target / name) for name in names.GPTRAIN_NAMES if (target / name).exists()}


@dataclass
class Writer:
    """A command that publishes a set: its entry point, and the arguments of an old and a new set into `target`."""

    entry: object
    old: list[str]
    new: list[str]
    target: Path
    fresh: bool = True  # also run into a folder that does not exist yet
    new_set: dict[str, str] = field(default_factory=dict)


def writer(kind: str, inputs: Path, models: Path, trained_run: Path, char_dataset: Path, root: Path) -> Writer:
    target = root / "target"
    out = ["--out", str(target)]
    if kind == "prepare_shakespeare":
        script = load_script("prepare_shakespeare").main
        return Writer(script, ["--input", str(inputs / "a.txt"), *out], ["--input", str(inputs / "b.txt"), *out],
                      target)
    if kind == "prepare_text":
        script = load_script("prepare_text").main
        return Writer(script, [str(inputs / "a.txt"), *out], [str(inputs / "b.txt"), *out, "--tokenizer", "gpt2"],
                      target)
    if kind == "prepare_chat":
        script, chats = load_script("prepare_chat").main, str(inputs / "chats.jsonl")
        return Writer(script, [chats, *out, "--block_size", "64"], [chats, *out, "--block_size", "64", "--seed", "1"],
                      target)
    if kind == "train_tokenizer":
        script = load_script("train_tokenizer").main
        return Writer(script, [str(inputs / "a.txt"), "--vocab_size", "300", *out],
                      [str(inputs / "b.txt"), "--vocab_size", "320", *out], target)
    if kind == "export-hf":
        export = ["export-hf", "--ckpt", str(trained_run), *out]
        return Writer(main, [*export, "--no_tokenizer"], export, target)
    if kind == "import-hf":
        return Writer(main, ["merge-lora", "--ckpt", str(models / "lora"), *out],
                      ["import-hf", str(models / "hf"), *out], target)
    if kind == "merge-lora":
        merge = ["merge-lora", "--ckpt", str(models / "lora"), *out]
        return Writer(main, ["import-hf", str(models / "hf"), *out], merge, target)
    assert kind == "train --overwrite"  # the old run is cleared as a whole before the new one starts
    config = write_config(root, char_dataset, out_dir=str(target), max_iters=1, eval_interval=1, eval_iters=1)
    return Writer(main, ["merge-lora", "--ckpt", str(models / "lora"), *out], ["train", str(config)], target,
                  fresh=False)


WRITERS = ("prepare_shakespeare", "prepare_text", "prepare_chat", "train_tokenizer", "export-hf", "import-hf",
           "merge-lora", "train --overwrite")


