"""Data preparation from any text: BPE offline, streaming in pieces, parallel workers, whole-document splits."""

import json

import numpy as np
import pytest
from conftest import SHAKESPEARE, run_cli

from gptrain.data import prepare as prepare_module
from gptrain.data import readers
from gptrain.data.prepare import prepare_dataset
from gptrain.data.tokenizer import load_tokenizer
from gptrain.errors import UserError


def ids(folder, split, dtype="uint16"):
    return np.fromfile(folder / f"{split}.bin", dtype=dtype)


def test_gpt2_shakespeare_reference_figures(tmp_path):
    meta = prepare_dataset([SHAKESPEARE], tmp_path, "gpt2")
    assert (meta["train_tokens"], meta["val_tokens"], meta["dtype"]) == (301_966, 36_059, "uint16")
    text = SHAKESPEARE.read_text()
    cut = int(len(text) * 0.9)
    gpt2 = load_tokenizer("gpt2")
    assert ids(tmp_path, "train").tolist() == gpt2.encode(text[:cut])
    assert ids(tmp_path, "val").tolist() == gpt2.encode(text[cut:])


def test_gpt2_tokenizer_matches_published_ids():
    gpt2 = load_tokenizer("gpt2")
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the quick brown fox") == [262, 2068, 7586, 21831]
    assert gpt2.vocab_size == 50257 and gpt2.eot_token == 50256
    assert gpt2.decode(gpt2.encode("naïve café 🤖")) == "naïve café 🤖"


def test_damaged_ranks_file_is_refused(tmp_path, monkeypatch):
    from gptrain.data import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "GPT2_RANKS_SHA256", "0" * 64)
    with pytest.raises(UserError, match="does not match GPT-2's published sha256"):
        tokenizer_module.gpt2_encoding()


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_small_pieces_and_two_workers_give_the_same_tokens(tmp_path, shakespeare_text, monkeypatch, tokenizer):
    source = tmp_path / "text.txt"
    source.write_text(shakespeare_text[:150_000])
    dtype = "uint16" if tokenizer == "gpt2" else "uint8"
    prepare_dataset([source], tmp_path / "whole", tokenizer)
    monkeypatch.setattr(readers, "READ_BYTES", 4096)  # dozens of pieces, cut mid-file
    monkeypatch.setattr(prepare_module, "WORK_CHARS", 3000)
    prepare_dataset([source], tmp_path / "pieces", tokenizer, workers=2)
    for split in ("train", "val"):
        assert np.array_equal(ids(tmp_path / "whole", split, dtype), ids(tmp_path / "pieces", split, dtype))


def make_folder(tmp_path, n=20):
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = {}
    for i in range(n):
        name = f"doc{i:02d}.{'md' if i % 3 == 0 else 'txt'}"
        texts[name] = f"Document number {i}: " + "word " * (5 + i) + "é\n"
        (folder / name).write_text(texts[name])
    (folder / "notes.py").write_text("print('not text')")  # neither .txt nor .md: ignored
    return folder, texts


def split_documents(folder, split):
    gpt2 = load_tokenizer("gpt2")
    tokens = ids(folder, split).tolist()
    docs, current = [], []
    for t in tokens:
        if t == gpt2.eot_token:
            docs.append(gpt2.decode(current))
            current = []
        else:
            current.append(t)
    assert current == []  # every document ends with <|endoftext|>
    return docs


def test_folder_of_documents_splits_whole_documents(tmp_path):
    folder, texts = make_folder(tmp_path)
    meta = prepare_dataset([folder], tmp_path / "out", "gpt2", val_fraction=0.2, seed=7)
    assert meta["documents"] == 20 and meta["split"] == "by document"
    train, val = split_documents(tmp_path / "out", "train"), split_documents(tmp_path / "out", "val")
    assert len(val) == 4 and len(train) == 16
    assert sorted(train + val) == sorted(texts.values())  # each document whole, in one split only
    again = prepare_dataset([folder], tmp_path / "again", "gpt2", val_fraction=0.2, seed=7)
    assert split_documents(tmp_path / "again", "val") == val and again == meta
    prepare_dataset([folder], tmp_path / "other", "gpt2", val_fraction=0.2, seed=8)
    assert split_documents(tmp_path / "other", "val") != val


def test_jsonl_documents_and_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"id": i, "body": f"record {i} " * 3} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    meta = prepare_dataset([path], tmp_path / "out", "gpt2", text_field="body")
    assert meta["documents"] == 10
    docs = split_documents(tmp_path / "out", "train") + split_documents(tmp_path / "out", "val")
    assert sorted(docs) == sorted(r["body"] for r in records)
    with pytest.raises(UserError, match=r"docs.jsonl:1 has no string field 'text'; .* --text_field"):
        prepare_dataset([path], tmp_path / "bad", "gpt2")


def test_character_level_documents_are_separated_by_an_end_of_text_character(tmp_path):
    """As BPE datasets put <|endoftext|> after each document, a character-level one of several documents puts
    CHAR_END_OF_TEXT there: a boundary the model can learn, rather than one document running into the next."""
    from gptrain.data.tokenizer import CHAR_END_OF_TEXT, tokenizer_from_meta

    folder, texts = make_folder(tmp_path, n=10)
    meta = prepare_dataset([folder], tmp_path / "out", "char")
    assert meta["itos"] == sorted(set("".join(texts.values())) | {CHAR_END_OF_TEXT})
    assert meta["itos"][meta["eot_token"]] == CHAR_END_OF_TEXT
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(t) + 1 for t in texts.values())
    tokenizer = tokenizer_from_meta(meta)
    for split in ("train", "val"):
        text = tokenizer.decode(np.fromfile(tmp_path / "out" / f"{split}.bin", dtype=meta["dtype"]).tolist())
        assert text.endswith(CHAR_END_OF_TEXT)
        assert all(doc in texts.values() for doc in text.split(CHAR_END_OF_TEXT)[:-1])
    single = prepare_dataset([folder / sorted(texts)[0]], tmp_path / "one", "char")  # one document: no separator
    assert single["eot_token"] is None and CHAR_END_OF_TEXT not in single["itos"]
    (folder / "odd.txt").write_text(f"a {CHAR_END_OF_TEXT} in the text")
    with pytest.raises(UserError, match="U\\+2403"):
        prepare_dataset([folder], tmp_path / "refused", "char")


def test_undecodable_bytes(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"plain text, then caf\xe9 in latin-1\n" * 20)
    with pytest.raises(UserError, match=r"latin1.txt: the bytes at offset 20 are not UTF-8.*--errors replace"):
        prepare_dataset([path], tmp_path / "out", "char")
    assert not (tmp_path / "out").exists()  # found in the scan, before anything was written
    meta = prepare_dataset([path], tmp_path / "out", "char", errors="replace")
    assert "\ufffd" in meta["itos"]


def test_bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="no text in"):
        prepare_dataset([tmp_path / "empty.txt"], tmp_path / "out")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="has no .txt, .md or .parquet files"):
        prepare_dataset([tmp_path / "nothing"], tmp_path / "out")
    with pytest.raises(UserError, match="not found"):
        prepare_dataset([tmp_path / "missing.txt"], tmp_path / "out")
    (tmp_path / "some.txt").write_text("some text " * 100)
    with pytest.raises(UserError, match="50257 ids does not fit uint8; use --dtype auto or uint16"):
        prepare_dataset([tmp_path / "some.txt"], tmp_path / "out", "gpt2", dtype="uint8")
    with pytest.raises(UserError, match="'no_such_encoding' is neither a tokenizer name .* nor a folder holding"):
        prepare_dataset([tmp_path / "some.txt"], tmp_path / "out", "no_such_encoding")


@pytest.mark.slow
def test_prepare_text_script_and_training_on_the_result(tmp_path):
    folder, _ = make_folder(tmp_path)
    result = run_cli("scripts/prepare_text.py", str(folder), "--out", str(tmp_path / "bpe"), "--tokenizer", "gpt2",
                     "--workers", "2", "--val_fraction", "0.25")
    assert result.returncode == 0, result.stderr
    assert "20 documents" in result.stdout and "vocab size 50,257 (uint16)" in result.stdout
    bad = run_cli("scripts/prepare_text.py", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    (tmp_path / "tiny.yaml").write_text("device: cpu\n")
    trained = run_cli("train", str(tmp_path / "tiny.yaml"), "--dataset=" + str(tmp_path / "bpe"),
                      f"--out_dir={tmp_path / 'run'}", "--n_layer=1",
                      "--n_head=2", "--n_embd=32", "--block_size=8", "--batch_size=2", "--max_iters=3",
                      "--eval_iters=1", "--eval_interval=3", "--device=cpu", "--dtype=float32")
    assert trained.returncode == 0, trained.stderr
    assert "step 3:" in trained.stdout
