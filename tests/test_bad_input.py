"""Every bad input: one `error:` line, exit code 2, and the files already in out_dir byte-identical."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from hf_tokenizers import save_with_tokenizer

from gptrain.cli import main, run_guarded
from gptrain.config import TrainConfig
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
    return lines[0]


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
    """A .bin changed after preparation, with a meta.json that no longer records its largest id: start-up scans
    the file and finds the id."""
    ids = np.fromfile(folder / "val.bin", dtype=np.uint8)
    ids[1234] = 200  # the vocabulary has 60-odd characters
    ids.tofile(folder / "val.bin")
    _bad_meta(max_token_id=None)(folder)


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
    expect_error(capsys, argv, "different model", "n_embd: 32 in", "vs 48 in the config", folder=run)


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


# ----- every class of bad input, by class (issue: nothing is lost, part 2) ------------------------------------

FLOAT_KEYS = [f.name for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_non_finite_config_values_are_refused(world, tmp_path, capsys, value):
    assert len(FLOAT_KEYS) == 22  # dpo_beta the newest
    for key in FLOAT_KEYS:
        argv = train_argv(world, tmp_path) + [f"--{key}={value}"]
        expect_error(capsys, argv, key, "finite", folder=world["run"])


@pytest.mark.parametrize("option, value", [("--temperature", "nan"), ("--temperature", "inf"),
                                           ("--top_p", "nan"), ("--top_p", "-inf")])
def test_non_finite_sampling_options_are_refused(world, capsys, option, value):
    expect_error(capsys, ["sample", "--ckpt", str(world["run"]), f"{option}={value}"], option, "finite",
                 folder=world["run"])


def test_non_finite_bench_peak_is_refused(world, tmp_path, capsys):
    for value in ("inf", "nan", "-1"):
        expect_error(capsys, ["bench", write_yaml(tmp_path, world["config"]), "--peak_tflops", value],
                     "--peak_tflops", folder=world["run"])


CONTRADICTIONS = {
    "min_lr above learning_rate": ("learning_rate: 1e-3\nmin_lr: 1e-2\n", "min_lr (0.01) is above learning_rate"),
    "a key given twice": ("max_iters: 10\nbatch_size: 4\nmax_iters: 20\n", "'max_iters' is given twice"),
    "an empty file": ("", "is empty"),
    "only comments": ("# nothing here\n# at all\n", "is empty"),
    "a negative seed": ("seed: -1\n", "seed must be between"),
    "a seed too large": ("seed: 9223372036854775808\n", "far too large"),
    "an integer beyond int64": ("eval_iters: 18446744073709551616\n", "far too large"),
    "a python tag": ("max_iters: !!python/object:os.system echo\n", "malformed YAML"),
    "warmup past the decay": ("warmup_iters: 100\nlr_decay_iters: 50\n", "lr_decay_iters (50) must be >="),
}


@pytest.mark.parametrize("case", CONTRADICTIONS)
def test_inconsistent_configs_are_refused(world, tmp_path, capsys, case):
    text, message = CONTRADICTIONS[case]
    base = "" if case in ("an empty file", "only comments") else yaml.safe_dump(
        {k: v for k, v in world["config"].items() if k not in text})
    expect_error(capsys, ["train", write_yaml(tmp_path, base + text), "--overwrite"], message, folder=world["run"])


def test_train_without_a_config_names_the_config(world, capsys):
    expect_error(capsys, ["train"], "needs a CONFIG", folder=world["run"])
    expect_error(capsys, ["train", "--max_iters=3"], "needs a CONFIG", folder=world["run"])


def test_a_model_larger_than_memory_is_refused_before_allocating(world, tmp_path, capsys):
    expect_error(capsys, train_argv(world, tmp_path, n_layer=100_000, n_embd=8192, n_head=64), "GiB",
                 "more than", folder=world["run"])


OUTPUT_PATHS = {
    "an existing file": lambda tmp: tmp / "a_file",
    "below a file": lambda tmp: tmp / "a_file" / "run",
    "a name too long to create": lambda tmp: tmp / ("x" * 300),
}


@pytest.mark.parametrize("case", OUTPUT_PATHS)
def test_output_paths_that_cannot_be_folders(world, tmp_path, capsys, case):
    (tmp_path / "a_file").write_text("not a folder")
    out = OUTPUT_PATHS[case](tmp_path)
    expect_error(capsys, train_argv(world, tmp_path, out_dir=str(out)), str(out)[:40], folder=tmp_path)
    expect_error(capsys, ["export-hf", "--ckpt", str(world["run"]), "--out", str(out)], folder=tmp_path)
    expect_error(capsys, ["bench", write_yaml(tmp_path, world["config"]), "--json", str(out / "b.json")],
                 folder=tmp_path)
    import runpy

    from conftest import ROOT

    prepare = runpy.run_path(str(ROOT / "scripts" / "prepare_text.py"), run_name="prepare_text")["main"]
    before = snapshot(tmp_path)
    assert run_guarded(prepare, [str(world["dataset"] / "input.txt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and snapshot(tmp_path) == before


def test_bench_json_that_is_a_folder(world, tmp_path, capsys):
    expect_error(capsys, ["bench", write_yaml(tmp_path, world["config"]), "--json", str(tmp_path)], "is a folder",
                 folder=world["run"])


NOT_UTF8 = b"learning_rate: 1e-3\n# caf\xe9\n"


def test_non_utf8_config_and_prompt_name_the_offset(world, tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes(NOT_UTF8)
    expect_error(capsys, ["train", str(config)], "latin1.yaml", "not UTF-8", f"offset {NOT_UTF8.index(0xe9)}",
                 folder=world["run"])
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\x00\x01 fine \xc3\x28")
    expect_error(capsys, ["sample", "--ckpt", str(world["run"]), "--start", f"FILE:{prompt}"], "prompt.txt",
                 "offset 8", folder=world["run"])


def test_non_utf8_run_files_for_diagnose(world, tmp_path, capsys):
    for name in ("config.yaml", "metrics.jsonl"):
        run = run_copy(world, tmp_path / name)
        with open(run / name, "ab") as f:
            f.write(b"\xff\xfe\n")
        expect_error(capsys, ["diagnose", str(run)], name, "not UTF-8", folder=run)


def _bad_meta(**fields):
    def breakage(folder):
        meta = json.loads((folder / "meta.json").read_text())
        meta.update(fields)
        (folder / "meta.json").write_text(json.dumps(meta))
    return breakage


FOREIGN_DATA = {
    "meta.json not UTF-8": (lambda f: (f / "meta.json").write_bytes(b'{"vocab_size": 6\xff}'), "not UTF-8"),
    "meta.json a list": (lambda f: (f / "meta.json").write_text("[1, 2]"), "must hold a JSON object"),
    "itos of numbers": (_bad_meta(itos=list(range(62))), "one distinct character per id"),
    "vocab_size a bool": (_bad_meta(vocab_size=True), "lacks a valid 'vocab_size'"),
    "meta.json a folder": (lambda f: ((f / "meta.json").unlink(), (f / "meta.json").mkdir()), "is a folder"),
    "train.bin a folder": (lambda f: ((f / "train.bin").unlink(), (f / "train.bin").mkdir()), "is a folder"),
}


@pytest.mark.parametrize("case", FOREIGN_DATA)
def test_foreign_dataset_files(world, tmp_path, capsys, case):
    breakage, message = FOREIGN_DATA[case]
    dataset = broken_dataset(world, tmp_path, breakage)
    expect_error(capsys, train_argv(world, tmp_path, dataset=dataset), message, folder=world["run"])


def test_dataset_that_is_a_file(world, tmp_path, capsys):
    expect_error(capsys, train_argv(world, tmp_path, dataset=str(world["dataset"] / "train.bin")), "is a file",
                 folder=world["run"])


def _checkpoint_with(world, **changes):
    def change(path):
        state = torch.load(path, weights_only=True)
        for key, value in changes.items():
            if value is None:
                state.pop(key)
            else:
                state[key] = value(state[key]) if callable(value) else value
        torch.save(state, path)
    return change


FOREIGN_CHECKPOINTS = {
    "random bytes": (lambda p: p.write_bytes(os.urandom(4096)), "not a readable checkpoint"),
    "a list": (lambda p: torch.save([1, 2, 3], p), "not a gptrain checkpoint"),
    "model not a dict": (_checkpoint_with(None, model=[1, 2]), "not a state dict"),
    "model_config with strings": (_checkpoint_with(None, model_config=lambda c: {**c, "n_layer": "two"}),
                                  "n_layer must be an integer"),
    "model_config with an unknown field": (_checkpoint_with(None, model_config=lambda c: {**c, "wings": 2}),
                                           "does not describe a GPT"),
    "dataset_meta with a bad itos": (_checkpoint_with(None, dataset_meta=lambda m: {**m, "itos": [1] * 62}),
                                     "one distinct character per id"),
}


@pytest.mark.parametrize("case", FOREIGN_CHECKPOINTS)
def test_foreign_checkpoints_on_sample_resume_and_export(world, tmp_path, capsys, case):
    change, message = FOREIGN_CHECKPOINTS[case]
    run = run_copy(world, tmp_path, change)
    (run / "ckpt_best.pt").unlink()
    expect_error(capsys, ["sample", "--ckpt", str(run)], message, folder=run)
    argv = ["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(run), "init_from": "resume"})]
    expect_error(capsys, argv, message, folder=run)
    expect_error(capsys, ["export-hf", "--ckpt", str(run), "--out", str(tmp_path / "hf")], message, folder=run)
    assert not (tmp_path / "hf").exists()


def test_checkpoint_without_training_state_cannot_resume(world, tmp_path, capsys):
    for key in ("progress", "sampler"):
        run = run_copy(world, tmp_path / key, _checkpoint_with(None, **{key: None}))
        argv = ["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(run), "init_from": "resume"})]
        expect_error(capsys, argv, "cannot be resumed", "init_from: from:", folder=run)


def test_folders_where_files_belong_and_the_reverse(world, tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("text")
    expect_error(capsys, ["train", str(folder)], "is a folder", folder=world["run"])
    expect_error(capsys, ["sample", "--ckpt", str(world["run"]), "--start", f"FILE:{folder}"], "is a folder",
                 folder=world["run"])
    expect_error(capsys, ["diagnose", str(a_file)], "is a file", folder=world["run"])
    expect_error(capsys, ["plot", str(a_file)], "is a file", folder=world["run"])
    expect_error(capsys, ["import-hf", str(a_file), "--out", str(tmp_path / "out")], "is a file",
                 folder=world["run"])
    expect_error(capsys, ["sample", "--ckpt", str(a_file / "ckpt.pt")], "a_file is a file", folder=world["run"])


def test_hugging_face_files_that_are_damaged(world, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    config = transformers.GPT2Config(vocab_size=65, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf)
    capsys.readouterr()  # transformers' own progress output
    weights = (hf / "model.safetensors").read_bytes()
    out = tmp_path / "out"
    for damage, message in ((weights[: len(weights) // 2], "not a readable safetensors file"),
                            (os.urandom(1000), "not a readable safetensors file")):
        (hf / "model.safetensors").write_bytes(damage)
        expect_error(capsys, ["import-hf", str(hf), "--out", str(out)], message, folder=hf)
    (hf / "model.safetensors").write_bytes(weights)
    good = (hf / "config.json").read_text()
    for damage, message in ((good.replace('"n_layer": 2', '"n_layer": "2"'), "n_layer must be a positive integer"),
                            (good.encode("utf-8") + b"\xff", "not UTF-8"), ("[]", "must hold a JSON object")):
        (hf / "config.json").write_bytes(damage if isinstance(damage, bytes) else damage.encode())
        expect_error(capsys, ["import-hf", str(hf), "--out", str(out)], message, folder=hf)
        assert not out.exists()


YAML_ODDITIES = {
    "nested 5000 deep": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "a list as a key": ("? [a, b]\n: 1\n", "a key must be a name"),
    "several documents": ("max_iters: 1\n---\nmax_iters: 2\n", "malformed YAML"),
}


@pytest.mark.parametrize("case", YAML_ODDITIES)
def test_yaml_oddities(world, tmp_path, capsys, case):
    text, message = YAML_ODDITIES[case]
    expect_error(capsys, ["train", write_yaml(tmp_path, text)], message, folder=world["run"])


def test_a_pipe_is_not_read_as_a_config(world, tmp_path, capsys):
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    expect_error(capsys, ["train", str(fifo)], "not a regular file", folder=world["run"])
    expect_error(capsys, ["sample", "--ckpt", str(world["run"]), "--start", f"FILE:{fifo}"], "not a regular file",
                 folder=world["run"])


@pytest.mark.parametrize("device", ["bogus", "cuda:abc", "meta", ""])
def test_device_strings_are_checked_everywhere(world, tmp_path, capsys, device):
    expect_error(capsys, ["sample", "--ckpt", str(world["run"]), "--device", device], "device must be",
                 folder=world["run"])
    expect_error(capsys, train_argv(world, tmp_path, device=device), "device must be", folder=world["run"])


@pytest.mark.parametrize("dtype", ["int4", "float64", "", "Float32"])
@pytest.mark.parametrize("command", ["sample", "chat", "serve"])
def test_decoding_dtypes_are_checked_everywhere(world, capsys, command, dtype):
    expect_error(capsys, [command, "--ckpt", str(world["run"]), "--dtype", dtype], "--dtype must be one of",
                 folder=world["run"])


@pytest.mark.parametrize("name, fragment", [
    ("bogus", "is neither a tokenizer name"), ("", "must not be empty"),
    ("{tmp}/no/such/folder", "is neither a tokenizer name"),  # a path that does not exist: not a name either
    ("{text}", "nor a .json file"),                          # an existing file that is not tokenizer JSON
    ("{tmp}", "tokenizer file"),                             # an existing folder without tokenizer.json
])
def test_unknown_tokenizer_is_one_line(world, tmp_path, capsys, name, fragment):
    import runpy

    from conftest import ROOT

    # Paths are built inside the test's own folders: what ../../etc/passwd names depends on where CI checks out.
    name = name.format(tmp=tmp_path, text=world["dataset"] / "input.txt")
    prepare = runpy.run_path(str(ROOT / "scripts" / "prepare_text.py"), run_name="prepare_text")["main"]
    assert run_guarded(prepare, [str(world["dataset"] / "input.txt"), "--out", str(tmp_path / "o"),
                                 "--tokenizer", name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_prepare_seed_out_of_range(world, tmp_path, capsys):
    import runpy

    from conftest import ROOT

    prepare = runpy.run_path(str(ROOT / "scripts" / "prepare_text.py"), run_name="prepare_text")["main"]
    assert run_guarded(prepare, [str(world["dataset"] / "input.txt"), "--out", str(tmp_path / "o"),
                                 "--seed=-1"]) == 2
    assert "--seed must be between" in capsys.readouterr().err


def test_plot_of_a_run_without_steps(world, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = run_copy(world, tmp_path)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(rows[0] + "\n")  # the start row only
    expect_error(capsys, ["plot", str(run)], "no training steps yet", folder=run)


def test_bench_json_never_replaces_a_foreign_file(world, tmp_path, capsys):
    precious = tmp_path / "precious.json"
    precious.write_text('{"mine": true}')
    expect_error(capsys, ["bench", write_yaml(tmp_path, world["config"]), "--json", str(precious)],
                 "not an earlier bench result", folder=tmp_path)


def test_resume_or_finetune_on_another_tokenizer_is_refused(world, tmp_path, capsys, shakespeare_text):
    from conftest import prepare_text

    other = tmp_path / "other"
    # As many distinct characters as the run's dataset, but other ones: same vocab_size, other meaning.
    vocab = len(json.loads((world["dataset"] / "meta.json").read_text())["itos"])
    alphabet = "".join(chr(0x400 + i) for i in range(vocab))
    prepare_text((alphabet * 2000)[:50_000], other)
    run = run_copy(world, tmp_path)
    argv = ["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(run), "init_from": "resume",
                                           "dataset": str(other)})]
    expect_error(capsys, argv, "another character set", "prepare the dataset with the model's tokenizer",
                 folder=run)
    argv = ["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(tmp_path / "ft"),
                                           "init_from": f"from:{run}", "dataset": str(other)})]
    expect_error(capsys, argv, "another character set", folder=run)


def test_broken_pipe_ends_quietly(world):
    import subprocess
    import sys

    from conftest import ROOT

    command = (f"{sys.executable} -m gptrain sample --ckpt {world['run']} --num_samples 50 --max_new_tokens 200 "
               "| head -c 10")
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert len(result.stdout) == 10
    assert result.stderr == "" and result.returncode == 141


def _all_nan(model):
    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in model.items()}


MORE_CHECKPOINTS = {
    "non-finite weights": (_checkpoint_with(None, model=_all_nan), "non-finite weights"),
    "a model_config of terabytes": (_checkpoint_with(None, model_config=lambda c: {**c, "n_embd": 10**7,
                                                                                 "n_head": 1}), "GiB"),
    "an unknown tokenizer": (_checkpoint_with(None, dataset_meta=lambda m: {**m, "tokenizer": "bogus_enc"}),
                             "unknown tokenizer 'bogus_enc'"),
}


@pytest.mark.parametrize("case", MORE_CHECKPOINTS)
def test_damaged_checkpoints_everywhere_they_are_read(world, tmp_path, capsys, case):
    change, message = MORE_CHECKPOINTS[case]
    run = run_copy(world, tmp_path, change)
    (run / "ckpt_best.pt").unlink()
    for argv in (["sample", "--ckpt", str(run)], ["export-hf", "--ckpt", str(run), "--out", str(tmp_path / "hf")],
                 ["grads", "--ckpt", str(run), "--random"]):
        expect_error(capsys, argv, message, folder=run)
    # Training compares the checkpoint with its config first, so it may name another problem first.
    for argv in (["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(run), "init_from": "resume"})],
                 ["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(tmp_path / "ft"),
                                                 "init_from": f"from:{run}"})]):
        expect_error(capsys, argv, folder=run)
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("progress", [{"iter_num": "5"}, None])
def test_damaged_training_state(world, tmp_path, capsys, progress):
    if progress is None:
        change = _checkpoint_with(None, optimizer="not a state dict")
    else:
        change = _checkpoint_with(None, progress=lambda p: {**p, **progress})
    run = run_copy(world, tmp_path, change)
    argv = ["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(run), "init_from": "resume",
                                           "max_iters": 8})]
    expect_error(capsys, argv, "cannot be resumed", folder=run)


def test_grads_needs_a_training_config_and_keeps_the_shape(world, tmp_path, capsys):
    run = run_copy(world, tmp_path, _checkpoint_with(None, train_config=None))
    (run / "ckpt_best.pt").unlink()
    expect_error(capsys, ["grads", "--ckpt", str(run), "--random"], "records no training config", folder=run)
    expect_error(capsys, ["grads", "--ckpt", str(world["run"]), "--n_layer=5"], "cannot change a trained model",
                 folder=world["run"])


def _train_id_out_of_range(folder):
    ids = np.fromfile(folder / "train.bin", dtype=np.uint8)
    ids[1234] = 200
    ids.tofile(folder / "train.bin")
    _bad_meta(max_token_id=None)(folder)


def test_grads_checks_the_token_ids(world, tmp_path, capsys):
    dataset = broken_dataset(world, tmp_path, _train_id_out_of_range)
    expect_error(capsys, ["grads", write_yaml(tmp_path, {**world["config"], "dataset": dataset})], "token id 200",
                 folder=world["run"])


def test_dataset_with_an_unknown_tokenizer(world, tmp_path, capsys):
    dataset = broken_dataset(world, tmp_path, _bad_meta(tokenizer="bogus_enc", itos=None))
    expect_error(capsys, train_argv(world, tmp_path, dataset=dataset), "unknown tokenizer", folder=world["run"])


def test_start_row_with_wrong_types(world, tmp_path, capsys):
    run = run_copy(world, tmp_path)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    start = json.loads(rows[0])
    rows[0] = json.dumps({**start, "vocab_size": "59"})
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    expect_error(capsys, ["diagnose", str(run)], "metrics.jsonl:1", "vocab_size", folder=run)


def test_folders_named_like_gptrain_files(world, tmp_path, capsys):
    run = run_copy(world, tmp_path)
    (run / "ckpt_best.pt").unlink()
    (run / "ckpt_best.pt").mkdir()
    expect_error(capsys, ["sample", "--ckpt", str(run)], "ckpt_best.pt is a folder", folder=run)
    expect_error(capsys, train_argv(world, tmp_path, out_dir=str(run)), "ckpt_best.pt is a folder", folder=run)
    import runpy

    from conftest import ROOT

    out = tmp_path / "data_out"
    (out / "train.bin").mkdir(parents=True)
    prepare = runpy.run_path(str(ROOT / "scripts" / "prepare_text.py"), run_name="prepare_text")["main"]
    assert run_guarded(prepare, [str(world["dataset"] / "input.txt"), "--out", str(out)]) == 2
    assert "train.bin is a folder" in capsys.readouterr().err


def test_override_values_taken_as_typed(world, tmp_path, capsys):
    expect_error(capsys, train_argv(world, tmp_path) + ["--init_from=from:"], "from:PATH", folder=world["run"])
    expect_error(capsys, train_argv(world, tmp_path) + ["--dataset="], "dataset must not be empty",
                 folder=world["run"])
    expect_error(capsys, train_argv(world, tmp_path) + ["--out_dir=/tmp/caf\udce9"], "not valid UTF-8",
                 folder=world["run"])


def test_prepare_workers_are_bounded(world, tmp_path, capsys):
    import runpy

    from conftest import ROOT

    prepare = runpy.run_path(str(ROOT / "scripts" / "prepare_text.py"), run_name="prepare_text")["main"]
    assert run_guarded(prepare, [str(world["dataset"] / "input.txt"), "--out", str(tmp_path / "o"),
                                 "--workers", "100000"]) == 2
    assert "4 per CPU core" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_resume_with_nothing_left_to_train(world, tmp_path, capsys):
    run = run_copy(world, tmp_path)
    argv = ["train", write_yaml(tmp_path, {**world["config"], "out_dir": str(run), "init_from": "resume",
                                           "max_iters": 2})]
    expect_error(capsys, argv, "nothing is left to train", "raise max_iters above 4", folder=run)


def test_extreme_sampling_settings_still_sample(world, capsys):
    for option in (["--temperature", "1e-45"], ["--temperature", "1e-300"], ["--top_p", "5e-324"]):
        code = run_guarded(main, ["sample", "--ckpt", str(world["run"]), "--num_samples", "1",
                                  "--max_new_tokens", "20", *option])
        out, err = capsys.readouterr()
        assert code == 0 and err == "" and len(out) > 40, err


def _deep_json(depth=100_000):
    return "[" * depth + "]" * depth


JSON_TRAPS = {
    "nested 100,000 deep": _deep_json(),
    "a 5000-digit number": '{"vocab_size": ' + "9" * 5000 + "}",
}


@pytest.mark.parametrize("case", JSON_TRAPS)
def test_json_traps_in_every_json_file(world, tmp_path, capsys, case):
    text = JSON_TRAPS[case]
    dataset = broken_dataset(world, tmp_path, lambda f: (f / "meta.json").write_text(text))
    expect_error(capsys, train_argv(world, tmp_path, dataset=dataset), "meta.json", folder=world["run"])
    run = run_copy(world, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2] + [text + "\n"] + lines[2:]))
    expect_error(capsys, ["diagnose", str(run)], "metrics.jsonl:3", folder=run)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(text)
    expect_error(capsys, ["import-hf", str(hf), "--out", str(tmp_path / "o")], "config.json", folder=hf)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n' + text + "\n")
    assert _prepare(["--out", str(tmp_path / "p"), str(corpus)]) == 2
    assert "c.jsonl:2" in capsys.readouterr().err


def _prepare(argv):
    import runpy

    from conftest import ROOT

    return run_guarded(runpy.run_path(str(ROOT / "scripts" / "prepare_text.py"), run_name="p")["main"], argv)


def test_lone_surrogates_are_not_characters(world, tmp_path, capsys):
    corpus = tmp_path / "s.jsonl"
    corpus.write_text('{"text": "a\\ud800b"}\n')
    assert _prepare([str(corpus), "--out", str(tmp_path / "p")]) == 2
    assert "lone surrogate" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert _prepare([str(corpus), "--out", str(tmp_path / "p"), "--errors", "replace"]) == 0
    dataset = broken_dataset(world, tmp_path, _bad_meta(itos=["\ud800"] + json.loads(
        (world["dataset"] / "meta.json").read_text())["itos"][1:]))
    expect_error(capsys, train_argv(world, tmp_path, dataset=dataset), "one distinct character", folder=world["run"])
    expect_error(capsys, ["sample", "--ckpt", str(world["run"]), "--start", "caf\udce9"], "not valid UTF-8",
                 folder=world["run"])


def test_devices_and_links_are_never_read_or_written_through(world, tmp_path, capsys):
    expect_error(capsys, ["bench", write_yaml(tmp_path, world["config"]), "--json", "/dev/zero"],
                 "not a regular file", folder=world["run"])
    dataset = broken_dataset(world, tmp_path, lambda f: ((f / "train.bin").unlink(),
                                                         (f / "train.bin").symlink_to("/dev/zero")))
    expect_error(capsys, train_argv(world, tmp_path, dataset=dataset), "a pipe or a device", folder=world["run"])
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").symlink_to(precious)
    expect_error(capsys, train_argv(world, tmp_path, out_dir=str(out)), "not gptrain's lock file", folder=tmp_path)
    (out / ".lock").unlink()
    (out / ".train.bin.tmp").symlink_to(precious)
    (out / "meta.json").symlink_to("/dev/zero")
    assert _prepare([str(world["dataset"] / "input.txt"), "--out", str(out), "--overwrite"]) == 0
    assert precious.read_text() == "mine"


def test_empty_paths_are_refused(world, tmp_path, capsys):
    for argv in (["import-hf", str(tmp_path), "--out", ""], ["export-hf", "--ckpt", str(world["run"]), "--out", ""],
                 ["bench", write_yaml(tmp_path, world["config"]), "--json", ""], ["sample", "--ckpt", ""]):
        expect_error(capsys, argv, "must not be empty", folder=world["run"])
    assert _prepare([str(world["dataset"] / "input.txt"), "--out", ""]) == 2
    assert "must not be empty" in capsys.readouterr().err


def test_hugging_face_weights_of_other_types_and_untied_heads(world, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    config = transformers.GPT2Config(vocab_size=65, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     tie_word_embeddings=False)
    reference = transformers.GPT2LMHeadModel(config).eval()
    save_with_tokenizer(reference, hf)
    capsys.readouterr()
    assert run_guarded(main, ["import-hf", str(hf), "--out", str(tmp_path / "untied")]) == 0
    from gptrain import checkpoint as ckpt_io

    ours, _ = ckpt_io.model_from_checkpoint(tmp_path / "untied" / "ckpt_last.pt", torch.device("cpu"))
    idx = torch.randint(0, 65, (1, 32))
    assert (ours.eval()(idx, idx)[0] - reference(idx).logits).abs().max() < 1e-4  # its own head, not wte
    weights = load_file(hf / "model.safetensors")
    save_file({k: v.to(torch.int32) for k, v in weights.items()}, hf / "model.safetensors")
    expect_error(capsys, ["import-hf", str(hf), "--out", str(tmp_path / "o")], "not floating-point", folder=hf)


def test_complex_weights_and_legacy_checkpoints(world, tmp_path, capsys):
    run = run_copy(world, tmp_path, _checkpoint_with(None, model=lambda m: {k: v.to(torch.complex64)
                                                                           for k, v in m.items()}))
    (run / "ckpt_best.pt").unlink()
    expect_error(capsys, ["sample", "--ckpt", str(run)], "floating-point", folder=run)
    legacy = run_copy(world, tmp_path / "legacy")
    state = torch.load(legacy / "ckpt_last.pt", weights_only=True)
    torch.save(state, legacy / "ckpt_last.pt", _use_new_zipfile_serialization=False)  # torch < 1.6's format
    (legacy / "ckpt_best.pt").unlink()
    assert run_guarded(main, ["sample", "--ckpt", str(legacy), "--max_new_tokens", "5", "--num_samples", "1"]) == 0


def test_a_dataset_folder_as_out_dir_gets_no_resume_advice(world, tmp_path, capsys):
    err = expect_error(capsys, train_argv(world, tmp_path, out_dir=str(world["dataset"]))[:-1], "holds a dataset",
                       folder=world["dataset"])
    assert "resume" not in (err or "")
