"""A token id at or above the vocabulary, in a .bin whose meta.json was left as it was (a file changed after
preparation, or paired with the wrong meta.json), is refused by every command that reads token files, plain and
chat datasets, train and val splits alike: one `error:` line naming the file and the position, exit code 2, and
nothing written. Up to SCAN_LIMIT_BYTES a split is read at start-up; above it, where the record in meta.json is
trusted, every read is checked instead (tests marked "as it is read")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY

from gptrain.cli import main, run_guarded
from gptrain.data import dataset as data

POSITION = 1234


def poisoned(source: Path, folder: Path, split: str, everywhere: bool = False) -> Path:
    """A copy of the dataset whose split holds the id vocab_size at POSITION (or, everywhere, at every position)."""
    shutil.copytree(source, folder)
    meta = json.loads((folder / "meta.json").read_text())
    path = folder / f"{split}.bin"
    ids = np.fromfile(path, dtype=meta["dtype"])
    if everywhere:
        ids[:] = meta["vocab_size"]
    else:
        ids[POSITION] = meta["vocab_size"]
    ids.tofile(path)
    return folder


def config(tmp_path: Path, dataset: Path, **changes) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**TINY, "dataset": str(dataset), "out_dir": str(tmp_path / "run"),
                                    "max_iters": 2, "eval_interval": 1, "eval_iters": 2, **changes}))
    return str(path)


def refused(capsys, argv, dataset: Path, split: str, position: int | None = POSITION) -> None:
    code = run_guarded(main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert str(dataset / f"{split}.bin") in lines[0] and ">= vocab_size" in lines[0], lines[0]
    if position is not None:
        assert f"at position {position}" in lines[0], lines[0]


COMMANDS = {
    "train": lambda cfg, ds, run, split: ["train", cfg],
    "eval": lambda cfg, ds, run, split: ["eval", "--ckpt", str(run), "--dataset", str(ds), "--split", split],
    "explain": lambda cfg, ds, run, split: ["explain", cfg],
    "grads": lambda cfg, ds, run, split: ["grads", cfg],
    "bench": lambda cfg, ds, run, split: ["bench", cfg, "--iters", "5", "--sample_tokens", "1"],
}


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_reader_of_a_plain_dataset_refuses_a_bad_id(command, split, char_dataset, trained_run, tmp_path,
                                                          capsys):
    dataset = poisoned(char_dataset, tmp_path / "data", split)
    refused(capsys, COMMANDS[command](config(tmp_path, dataset), dataset, trained_run, split), dataset, split)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_every_reader_of_a_chat_dataset_refuses_a_bad_id(command, split, chat_dataset, tmp_path, capsys):
    dataset = poisoned(chat_dataset, tmp_path / "data", split)
    run = tmp_path / "chat_run"
    clean = config(tmp_path, chat_dataset, out_dir=str(run), block_size=64, chat_eval_answers=2)
    assert run_guarded(main, ["train", clean]) == 0  # a chat model, for eval
    refused(capsys, COMMANDS[command](config(tmp_path, dataset, block_size=64, chat_eval_answers=2), dataset, run,
                                      split), dataset, split)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_above_the_scan_limit_every_read_is_checked(command, char_dataset, trained_run, tmp_path, capsys,
                                                    monkeypatch):
    """meta.json's record is trusted for a large split, so the bad ids reach the readers: they refuse them."""
    monkeypatch.setattr(data, "SCAN_LIMIT_BYTES", 0)
    dataset = poisoned(char_dataset, tmp_path / "data", "val", everywhere=True)
    refused(capsys, COMMANDS[command](config(tmp_path, dataset), dataset, trained_run, "val"), dataset, "val",
            position=None)


def test_exact_match_reads_checked_conversations(chat_dataset, tmp_path):
    """The held-out questions of exact-match evaluation come through the same checked reads."""
    from gptrain.data.chat_batches import open_chat_split
    from gptrain.errors import UserError

    dataset = poisoned(chat_dataset, tmp_path / "data", "val", everywhere=True)
    meta = json.loads((dataset / "meta.json").read_text())
    split = open_chat_split(dataset, "val", data.open_split(dataset, "val", meta["dtype"], meta["vocab_size"]))
    with pytest.raises(UserError, match="val.bin: token id .* at position 0 "):
        split.conversation(0)
