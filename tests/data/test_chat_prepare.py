"""scripts/prepare_chat.py: conversations -> ids, mask and offsets that agree; bad conversations named by file and
line, or skipped and counted; the base tokenizer from a checkpoint; the out folder's rules."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

from gptrain.cli import run_guarded
from gptrain.data.chat import render
from gptrain.data.chat_prepare import ChatPrepareOptions, prepare_chat
from gptrain.data.dataset import load_meta
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.errors import UserError


def turn(question: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def conversations(n: int = 30) -> list[dict]:
    """Conversations of one or two turns, some opened by a system message."""
    made = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        messages += turn(f"Say {i}.", f"{i}.")
        if i % 2:
            messages += turn("Again?", f"Yes, {i}.")
        made.append({"messages": messages})
    return made


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def read_split(folder: Path, split: str, dtype: str):
    return (np.fromfile(folder / f"{split}.bin", dtype=dtype), np.fromfile(folder / f"{split}_mask.bin", np.uint8),
            np.fromfile(folder / f"{split}_docs.bin", np.int64))


def test_outputs_agree_and_hold_every_conversation_once(tmp_path):
    source = write_jsonl(tmp_path / "chats.jsonl", conversations())
    meta, unchanged, _ = prepare_chat([source], tmp_path / "data", ChatPrepareOptions(block_size=64))
    assert not unchanged and load_meta(tmp_path / "data") == meta  # and it validates
    tokenizer = tokenizer_from_meta(meta)
    assert meta["vocab_size"] == len(meta["itos"]) + 4 == tokenizer.vocab_size
    expected = {json.dumps(c["messages"]): render(tokenizer, c["messages"]) for c in conversations()}
    seen = []
    for split in ("train", "val"):
        ids, mask, starts = read_split(tmp_path / "data", split, meta["dtype"])
        assert len(ids) == len(mask) == meta[f"{split}_tokens"]
        assert len(starts) == meta[f"{split}_conversations"] and starts[0] == 0 and (np.diff(starts) > 0).all()
        for start, end in zip(starts, [*starts[1:], len(ids)]):
            text = tokenizer.decode(ids[start:end].tolist())
            match = [key for key, (rendered, _) in expected.items() if tokenizer.decode(rendered) == text]
            assert len(match) == 1
            assert mask[start:end].tolist() == expected[match[0]][1]
            seen.append(match[0])
    assert sorted(seen) == sorted(expected)  # whole conversations, each in one split
    assert meta["val_conversations"] == 3 and meta["documents"] == 30


def test_the_split_is_seeded(tmp_path):
    source = write_jsonl(tmp_path / "chats.jsonl", conversations())
    runs = [prepare_chat([source], tmp_path / name, ChatPrepareOptions(block_size=64, seed=seed))[0]
            for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    val = [(tmp_path / name / "val.bin").read_bytes() for name in "abc"]
    assert val[0] == val[1] != val[2] and runs[0] == runs[1]


BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}]}', "user -> user"),
    ('{"messages": [{"role": "bot", "content": "Hi"}]}', "the role 'bot'"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "Hi"}]}', "no content"),
    ('{"messages": [{"role": "user", "content": "Hi"}]}', "ending with assistant"),
    ('{"messages": []}', "no messages"),
    ('{"text": "Hi"}', '"messages" list'),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "' + "long " * 20 + '"}, {"role": "assistant", "content": "x"}]}',
     "more than --block_size 64"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_a_bad_conversation_stops_with_its_file_and_line(tmp_path, line, message):
    good = [json.dumps(c) for c in conversations(5)]
    source = write_jsonl(tmp_path / "chats.jsonl", [*good[:3], "", line, *good[3:]])
    with pytest.raises(UserError, match=message) as caught:
        prepare_chat([source], tmp_path / "data", ChatPrepareOptions(block_size=64))
    assert str(caught.value).startswith(f"{source}:5: ") and "--on_error skip" in str(caught.value)
    assert not (tmp_path / "data").exists()  # nothing written, no folder left behind


def test_skip_leaves_bad_conversations_out_and_counts_them(tmp_path, capsys):
    good = [json.dumps(c) for c in conversations(20)]
    source = write_jsonl(tmp_path / "chats.jsonl", [*good[:10], *(line for line, _ in BAD_LINES), *good[10:]])
    code = run_guarded(load_script("prepare_chat").main, [str(source), "--out", str(tmp_path / "data"),
                                                          "--block_size", "64", "--on_error", "skip"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"skipped {len(BAD_LINES)} bad conversations" in captured.err
    assert f"the first: {source}:11: " in captured.err
    meta = load_meta(tmp_path / "data")
    assert meta["documents"] == 20 and meta["skipped_conversations"] == len(BAD_LINES)


def test_nothing_usable_is_an_error(tmp_path):
    source = write_jsonl(tmp_path / "chats.jsonl", [line for line, _ in BAD_LINES])
    with pytest.raises(UserError, match=f"no usable conversations.*skipped {len(BAD_LINES)}"):
        prepare_chat([source], tmp_path / "data", ChatPrepareOptions(block_size=64, on_error="skip"))


def test_gpt2_base_tokenizer(tmp_path):
    source = write_jsonl(tmp_path / "chats.jsonl", conversations())
    meta, _, _ = prepare_chat([source], tmp_path / "data", ChatPrepareOptions("gpt2", block_size=64))
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50261, "uint16")
    assert meta["chat"]["first_special_id"] == 50257 and meta["max_token_id"] == 50260


def test_your_own_bpe_as_the_base(tmp_path, shakespeare_text):
    pytest.importorskip("tokenizers")
    from gptrain.data.bpe_training import train_bpe

    bpe = train_bpe([shakespeare_text[:20_000]], vocab_size=300)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(bpe.json, encoding="utf-8")
    source = write_jsonl(tmp_path / "chats.jsonl", conversations())
    meta, _, _ = prepare_chat([source], tmp_path / "data", ChatPrepareOptions(str(tmp_path / "tok"), block_size=64))
    assert meta["tokenizer_json"] == bpe.json and meta["vocab_size"] == bpe.vocab_size + 4
    tokenizer = tokenizer_from_meta(load_meta(tmp_path / "data"))
    decoded = []
    for split in ("train", "val"):
        ids, _, starts = read_split(tmp_path / "data", split, meta["dtype"])
        decoded += [tokenizer.decode(ids[a:b].tolist()) for a, b in zip(starts, [*starts[1:], len(ids)])]
    spelled = ["".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in c["messages"]) for c in conversations()]
    assert sorted(decoded) == sorted(spelled)


def test_the_tokenizer_of_a_checkpoint(tmp_path, trained_run):
    """from:CKPT: the model's own characters (the fine-tuned ids mean the same text), its block_size by default,
    and a character it never saw is a bad conversation."""
    from gptrain.checkpoint import find_checkpoint, load_checkpoint
    from gptrain.commands.prepare import checkpoint_tokenizer

    run_meta = load_checkpoint(find_checkpoint(trained_run))["dataset_meta"]
    checkpoint = checkpoint_tokenizer(str(trained_run))
    source = write_jsonl(tmp_path / "chats.jsonl", [{"messages": turn(f"Say {w}.", f"{w}.")} for w in
                                                    ("yes", "no", "maybe", "never", "now", "then", "so")])
    meta, _, _ = prepare_chat([source], tmp_path / "data", ChatPrepareOptions(checkpoint=checkpoint))
    assert meta["itos"] == run_meta["itos"] and meta["block_size"] == 32
    write_jsonl(source, [{"messages": turn("Say 7.", "7.")}] * 5)  # digits: not in the run's characters
    with pytest.raises(UserError, match=f"{source}:1: characters '7' are not in this model's vocabulary"):
        prepare_chat([source], tmp_path / "other", ChatPrepareOptions(checkpoint=checkpoint))
    with pytest.raises(UserError, match="longer than .* model reads \\(32 tokens\\)"):
        prepare_chat([source], tmp_path / "other", ChatPrepareOptions(block_size=33, checkpoint=checkpoint))


def test_the_out_folder_rules(tmp_path, trained_run):
    source = write_jsonl(tmp_path / "chats.jsonl", conversations())
    out = tmp_path / "data"
    prepare_chat([source], out, ChatPrepareOptions(block_size=64))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare_chat([source], out, ChatPrepareOptions(block_size=64))[1]  # the same: left unchanged
    write_jsonl(source, conversations(40))
    with pytest.raises(UserError, match="already holds a different dataset"):
        prepare_chat([source], out, ChatPrepareOptions(block_size=64))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    prepare_chat([source], out, ChatPrepareOptions(block_size=64, overwrite=True))
    assert load_meta(out)["documents"] == 40
    with pytest.raises(UserError, match="already holds a run"):
        prepare_chat([source], trained_run, ChatPrepareOptions(block_size=64))


def test_a_text_dataset_written_over_a_chat_one_leaves_no_mask_behind(tmp_path):
    from conftest import prepare_text

    source = write_jsonl(tmp_path / "chats.jsonl", conversations())
    prepare_chat([source], tmp_path / "data", ChatPrepareOptions(block_size=64))
    prepare_text("Some text. " * 50, tmp_path / "data", overwrite=True)
    assert not list((tmp_path / "data").glob("*_mask.bin")) and not list((tmp_path / "data").glob("*_docs.bin"))


@pytest.mark.parametrize("args, message", [
    (["missing.jsonl", "--block_size", "64"], "not found"),
    ([".", "--block_size", "64"], "is a folder"),
    (["chats.jsonl"], "--block_size is required"),
    (["chats.jsonl", "--block_size", "0"], "--block_size must be a positive"),
    (["chats.jsonl", "--block_size", "64", "--val_fraction", "1"], "--val_fraction must be between 0 and 1"),
    (["chats.jsonl", "--block_size", "64", "--val_fraction", "0.99"], "leaves no training conversations"),
    (["chats.jsonl", "--block_size", "64", "--seed", "-1"], "--seed must be"),
    (["chats.jsonl", "--block_size", "64", "--on_error", "ignore"], "invalid choice"),
    (["chats.jsonl", "--block_size", "64", "--tokenizer", "nonsense"], "--tokenizer 'nonsense'"),
    (["chats.jsonl", "--tokenizer", "from:nowhere"], "checkpoint nowhere not found"),
    (["chats.jsonl", "--block_size", "64", "--out", "chats.jsonl"], "is a file, not a folder"),
])
def test_bad_arguments_end_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "chats.jsonl", conversations())
    argv = args if "--out" in args else [*args, "--out", "data"]
    code = run_guarded(load_script("prepare_chat").main, argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "data").exists()
