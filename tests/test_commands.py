"""Every user-facing job is a `gptrain` command: prepare, tokenizer, configs, and a shipped config trained by name.
The older scripts are thin wrappers of the same commands."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import SHAKESPEARE, TINY, load_script

import gptrain
from gptrain.cli import build_parser, main, run_guarded
from gptrain.config import config_path, shipped_configs


def one_error(capsys, argv, *fragments) -> str:
    code = run_guarded(main, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"gptrain {gptrain.__version__}"


def test_prepare_shakespeare_writes_under_the_current_folder_from_the_shipped_text(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_guarded(main, ["prepare", "shakespeare"]) == 0
    meta = json.loads((tmp_path / "data" / "shakespeare_char" / "meta.json").read_text())
    assert meta["characters"] == len(SHAKESPEARE.read_text(encoding="utf-8")) == 1_115_394
    assert "left unchanged" not in capsys.readouterr().out
    assert run_guarded(main, ["prepare", "shakespeare"]) == 0  # again: the same dataset, nothing written
    assert "left unchanged" in capsys.readouterr().out


def test_the_scripts_are_the_commands(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:5000])
    out_script, out_command = tmp_path / "script", tmp_path / "command"
    assert run_guarded(load_script("prepare_text").main, [str(tmp_path / "a.txt"), "--out", str(out_script)]) == 0
    assert run_guarded(main, ["prepare", "text", str(tmp_path / "a.txt"), "--out", str(out_command)]) == 0
    assert (out_script / "train.bin").read_bytes() == (out_command / "train.bin").read_bytes()
    assert run_guarded(load_script("prepare_text").main, ["--out", str(out_script)]) == 2  # its errors too
    assert "the following arguments are required: INPUT" in capsys.readouterr().err


def test_tokenizer_train_and_prepare_chat_are_commands(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000])
    assert run_guarded(main, ["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab_size", "300", "--out",
                              str(tmp_path / "tok")]) == 0
    assert json.loads((tmp_path / "tok" / "training.json").read_text())["vocab_size"] == 300
    chats = [{"messages": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": f"{i}."}]}
             for i in range(20)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    assert run_guarded(main, ["prepare", "chat", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "chat"),
                              "--block_size", "32"]) == 0
    assert "chat" in json.loads((tmp_path / "chat" / "meta.json").read_text())
    one_error(capsys, ["prepare"], "required: kind")
    one_error(capsys, ["tokenizer"], "required: action")


def test_configs_lists_every_shipped_config_on_one_line(capsys):
    assert run_guarded(main, ["configs"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(shipped_configs())
    assert "shakespeare_char_cpu" in shipped_configs() and all(len(line.split()) > 1 for line in lines)


def test_configs_copy_writes_one_to_edit_and_refuses_to_overwrite(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    assert run_guarded(main, ["configs", "copy", "shakespeare_char_cpu", str(dest)]) == 0
    assert dest.read_bytes() == shipped_configs()["shakespeare_char_cpu"].read_bytes()
    one_error(capsys, ["configs", "copy", "shakespeare_char_cpu", str(dest)], "already exists", "--overwrite")
    assert run_guarded(main, ["configs", "copy", "gpt2", str(dest), "--overwrite"]) == 0
    assert "n_layer: 12" in dest.read_text()
    assert run_guarded(main, ["configs", "copy", "gpt2.yaml", str(tmp_path)]) == 0  # a folder: NAME.yaml in it
    assert (tmp_path / "gpt2.yaml").is_file()
    one_error(capsys, ["configs", "copy", "nope", str(tmp_path / "x.yaml")], "no shipped config named 'nope'")
    one_error(capsys, ["configs", "copy", "gpt2", str(dest / "below")], "cannot be created")


def test_a_shipped_config_trains_by_name_unless_a_file_of_that_name_exists(tmp_path, monkeypatch, char_dataset):
    monkeypatch.chdir(tmp_path)
    assert config_path("shakespeare_char_cpu") == shipped_configs()["shakespeare_char_cpu"]
    assert config_path("shakespeare_char_cpu.yaml") == shipped_configs()["shakespeare_char_cpu"]
    (tmp_path / "shakespeare_char_cpu").write_text(yaml.safe_dump({**TINY, "dataset": str(char_dataset)}))
    assert config_path("shakespeare_char_cpu").resolve() == tmp_path / "shakespeare_char_cpu"  # a file wins
    overrides = [f"--{k}={v}" for k, v in {**TINY, "max_iters": 2, "eval_interval": 2}.items()]
    assert run_guarded(main, ["train", "shakespeare_char_cpu.yaml", f"--dataset={char_dataset}",
                              f"--out_dir={tmp_path / 'run'}", *overrides]) == 0
    assert (tmp_path / "run" / "ckpt_last.pt").is_file()


def test_an_unknown_config_names_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_error(capsys, ["train", "no_such_config"], "no_such_config not found", "shakespeare_char_cpu",
              "gptrain configs")
