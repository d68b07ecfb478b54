"""Every bad input: one `error:` line, exit code 2, and the files already in out_dir byte-identical."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY

from gptrain.cli import main, run_guarded
from gptrain.train import train


@pytest.fixture(scope="module")
def world(tmp_path_factory, char_dataset):
    """A finished tiny run, and a prepared dataset to break in different ways."""
    root = tmp_path_factory.mktemp("bad_input")
    run = root / "run"
    config = {**TINY, "dataset": str(char_dataset), "out_dir": str(run), "max_iters": 4, "eval_interval": 2}
    from gptrain.config import build_config

    train(build_config(dict(config)))
    return {"root": root, "run": run, "config": config, "dataset": char_dataset}


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.exists() else {}


def write_yaml(folder: Path, content) -> str:
    path = folder / "config.yaml.in"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


def broken_dataset(world, tmp_path, breakage) -> str:
    folder = tmp_path / "data"
    shutil.copytree(world["dataset"], folder)
    breakage(folder)
    return str(folder)


def expect_error(capsys, argv, *fragments, folder: Path):
    before = snapshot(folder)
    code = run_guarded(main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    assert snapshot(folder) == before


def train_argv(world, tmp_path, **changes):
    return ["train", write_yaml(tmp_path, {**world["config"], **changes}), "--overwrite"]


CONFIG_CASES = {
    "unknown key": ({"n_layers": 2}, "did you mean 'n_layer'"),
    "wrong type": ({"batch_size": "ten"}, "batch_size must be an integer, got 'ten'"),
    "n_embd not divisible": ({"n_embd": 30, "n_head": 4}, "divisible by n_head"),
    "zero batch": ({"batch_size": 0}, "batch_size must be >= 1"),
    "block larger than val split": ({"block_size": 50_000}, "too few for block_size 50000"),
    "dropout out of range": ({"dropout": 1.5}, "dropout must be in [0, 1)"),
    "unknown dtype": ({"dtype": "float8"}, "dtype must be one of"),
    "missing dataset": ({"dataset": "/nonexistent/data"}, "not found"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_values(world, tmp_path, capsys, case):
    changes, message = CONFIG_CASES[case]
    expect_error(capsys, train_argv(world, tmp_path, **changes), message, folder=world["run"])


def test_malformed_and_non_mapping_yaml(world, tmp_path, capsys):
    expect_error(capsys, ["train", write_yaml(tmp_path, "out_dir: [unclosed\n")], "malformed YAML",
                 folder=world["run"])
    expect_error(capsys, ["train", write_yaml(tmp_path, "- just\n- a list\n")], "must be a YAML mapping",
                 folder=world["run"])


def _odd_size(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["dtype"] = "uint16"
    (folder / "meta.json").write_text(json.dumps(meta))
    if (folder / "train.bin").stat().st_size % 2 == 0:
        with open(folder / "train.bin", "ab") as f:
            f.write(b"\x00")


def _id_out_of_range(folder):
    ids = np.fromfile(folder / "val.bin", dtype=np.uint8)
    ids[1234] = 200  # the vocabulary has 60-odd characters
    ids.tofile(folder / "val.bin")


DATA_CASES = {
    "missing train.bin": (lambda f: (f / "train.bin").unlink(), "train.bin is missing"),
    "size not a multiple of the dtype": (_odd_size, "not a multiple of 2"),
    "token id >= vocab_size": (_id_out_of_range, "token id 200 at position 1234 is >= vocab_size"),
    "meta.json missing": (lambda f: (f / "meta.json").unlink(), "meta.json is missing"),
    "meta.json malformed": (lambda f: (f / "meta.json").write_text("{\"vocab_size\": 6"), "not valid JSON"),
    "meta.json wrong fields": (lambda f: (f / "meta.json").write_text("{\"vocab_size\": \"x\"}"), "lacks a valid"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data(world, tmp_path, capsys, case):
    breakage, message = DATA_CASES[case]
    dataset = broken_dataset(world, tmp_path, breakage)
    expect_error(capsys, train_argv(world, tmp_path, dataset=dataset), message, folder=world["run"])


def run_copy(world, tmp_path, change=None) -> Path:
    run = tmp_path / "run_copy"
    shutil.copytree(world["run"], run)
    if change:
        change(run / "ckpt_last.pt")
    return run


CHECKPOINT_CASES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a readable checkpoint"),
    "empty": (lambda p: p.write_bytes(b""), "not a readable checkpoint"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint_on_resume_and_sample(world, tmp_path, capsys, case):
    change, message = CHECKPOINT_CASES[case]
    run = run_copy(world, tmp_path, change)
    argv = ["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(run), "init_from": "resume"})]
    expect_error(capsys, argv, message, folder=run)
    expect_error(capsys, ["sample", "--ckpt", str(run / "ckpt_last.pt")], message, folder=run)


def test_checkpoint_shapes_must_match_the_config(world, tmp_path, capsys):
    run = run_copy(world, tmp_path)
    argv = ["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(run), "init_from": "resume",
                                           "n_embd": 48})]
    expect_error(capsys, argv, "different model", "n_embd: checkpoint 32 vs config 48", folder=run)


def test_missing_checkpoints(world, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    expect_error(capsys, ["sample", "--ckpt", str(empty)], "no checkpoint in", folder=empty)
    argv = ["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(empty), "init_from": "resume"})]
    expect_error(capsys, argv, "does not exist", folder=empty)


def test_refuses_to_overwrite_another_run(world, tmp_path, capsys):
    argv = ["train", write_yaml(tmp_path, world["config"])]
    expect_error(capsys, argv, "already holds a run", "--overwrite", "--init_from=resume", folder=world["run"])


def test_crafted_checkpoint_cannot_run_code(world, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    run = run_copy(world, tmp_path)
    torch.save({"model": Payload(), "model_config": {}}, run / "ckpt_last.pt")
    expect_error(capsys, ["sample", "--ckpt", str(run / "ckpt_last.pt")], "was refused", folder=run)
    argv = ["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(run), "init_from": "resume"})]
    expect_error(capsys, argv, "was refused", folder=run)
    assert not marker.exists()


def test_empty_prompt_and_unknown_argument(world, tmp_path, capsys):
    expect_error(capsys, ["sample", "--ckpt", str(world["run"]), "--start", ""], "prompt is empty",
                 folder=world["run"])
    expect_error(capsys, ["sample", "--ckpt", str(world["run"]), "--bogus"], "unrecognized arguments",
                 folder=world["run"])
    expect_error(capsys, ["train", write_yaml(tmp_path, world["config"]), "max_iters=3"], "--name=value",
                 folder=world["run"])
