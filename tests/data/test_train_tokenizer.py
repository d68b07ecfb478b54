"""scripts/train_tokenizer.py and the tokenizer folders prepare_text.py --tokenizer takes: what is written, and
every bad setting, input, output folder or tokenizer file as one `error:` line with nothing on disk changed."""

import json
import runpy

import pytest
from conftest import ROOT

from gptrain.cli import run_guarded
from gptrain.data.hf_bpe import read_own_tokenizer

pytest.importorskip("tokenizers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

TRAIN = runpy.run_path(str(ROOT / "scripts" / "train_tokenizer.py"), run_name="train_tokenizer")["main"]
PREPARE = runpy.run_path(str(ROOT / "scripts" / "prepare_text.py"), run_name="prepare_text")["main"]


@pytest.fixture
def corpus(tmp_path, shakespeare_text):
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare_text[:40_000], encoding="utf-8")
    return path


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def one_error(capsys, entry, argv, root, *fragments):
    before = snapshot(root)
    code = run_guarded(entry, [str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert snapshot(root) == before
    return err


def test_writes_a_tokenizer_and_how_it_was_trained(tmp_path, corpus, capsys):
    assert run_guarded(TRAIN, [str(corpus), "--vocab_size", "300", "--out", str(tmp_path / "tok"),
                               "--pattern", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "a byte-level BPE of 300 tokens, pattern gpt2" in out and "--tokenizer" in out
    tokenizer = read_own_tokenizer(tmp_path / "tok")
    info = json.loads((tmp_path / "tok" / "training.json").read_text())
    assert tokenizer.vocab_size == info["vocab_size"] == 300
    assert info["tokenizer_sha256"] == tokenizer.sha256 and info["characters"] == 40_000
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "training.json"]


def test_max_chars_and_a_text_with_fewer_pairs_than_asked(tmp_path, corpus, capsys):
    assert run_guarded(TRAIN, [str(corpus), "--vocab_size", "100000", "--out", str(tmp_path / "tok"),
                               "--max_chars", "500"]) == 0
    assert "(asked for 100,000: the text has no more pairs to merge)" in capsys.readouterr().out
    info = json.loads((tmp_path / "tok" / "training.json").read_text())
    assert info["characters"] == 500 and 257 < info["vocab_size"] < 500


def test_overwrite_replaces_the_tokenizer_and_leaves_other_files(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "tokenizer.json").write_text("old")
    assert run_guarded(TRAIN, [str(corpus), "--vocab_size", "300", "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert read_own_tokenizer(out).vocab_size == 300


def bad_training_cases(tmp_path, corpus):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "tokenizer.json").write_text("keep me")
    (tmp_path / "odd" / "tokenizer.json").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a parquet row"]}), tmp_path / "t.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a row"]})}).save_to_disk(tmp_path / "saved")
    out = ["--out", tmp_path / "tok"]
    return {
        "vocabulary too small": ([corpus, "--vocab_size", "256", *out], "--vocab_size must be between 257"),
        "vocabulary too large": ([corpus, "--vocab_size", str(2**32 + 1), *out], "and 4,294,967,296"),
        "vocabulary not a number": ([corpus, "--vocab_size", "lots", *out], "invalid int value"),
        "vocabulary missing": ([corpus, *out], "--vocab_size"),
        "unknown pattern": ([corpus, "--vocab_size", "300", "--pattern", "gpt3", *out], "invalid choice"),
        "max_chars zero": ([corpus, "--vocab_size", "300", "--max_chars", "0", *out], "--max_chars must be"),
        "missing input": ([tmp_path / "nope.txt", "--vocab_size", "300", *out], "nope.txt not found"),
        "empty input": ([tmp_path / "empty.txt", "--vocab_size", "300", *out], "no text in"),
        "bad record": ([tmp_path / "bad.jsonl", "--vocab_size", "300", *out], "bad.jsonl:2 has no string field"),
        "out is a file": ([corpus, "--vocab_size", "300", "--out", tmp_path / "a_file"], "is a file, not a folder"),
        "out below a file": ([corpus, "--vocab_size", "300", "--out", tmp_path / "a_file" / "t"], "a_file is a file)"),
        "out not empty": ([corpus, "--vocab_size", "300", "--out", tmp_path / "full"], "is not empty"),
        "a folder in the way": ([corpus, "--vocab_size", "300", "--out", tmp_path / "odd", "--overwrite"],
                                "tokenizer.json is a folder or a device"),
        "missing column": ([tmp_path / "t.parquet", "--vocab_size", "300", "--text_field", "body", *out],
                           "t.parquet has no column 'body' (it has text)"),
        "missing split": ([tmp_path / "saved", "--vocab_size", "300", "--split", "test", *out], "no split 'test'"),
    }


def test_bad_training_inputs(tmp_path, corpus, capsys):
    cases = bad_training_cases(tmp_path, corpus)
    capsys.readouterr()  # forget what writing the inputs printed
    for name, (argv, fragment) in cases.items():
        err = one_error(capsys, TRAIN, argv, tmp_path, fragment)
        assert "Traceback" not in err, name


def tokenizer_variants(good: dict) -> dict:
    """Tokenizer files that must be refused, each made from a good one."""
    wordpiece = {**good, "model": {"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "a"}}
    not_bytes = {**good, "pre_tokenizer": {"type": "Whitespace"}, "decoder": None}
    normalized = {**good, "normalizer": {"type": "NFKC"}}
    no_eot = {**good, "added_tokens": []}
    gaps = json.loads(json.dumps(good))
    gaps["model"]["vocab"][next(iter(gaps["model"]["vocab"]))] = 99_999
    return {
        "not json": ("{tokenizer", "is not valid JSON"),
        "not an object": ("[1, 2]", "must hold a JSON object"),
        "not bpe": (json.dumps(wordpiece), "is not a BPE tokenizer"),
        "not byte level": (json.dumps(not_bytes), "is not byte-level"),
        "a normalizer": (json.dumps(normalized), "has a normalizer"),
        "no endoftext": (json.dumps(no_eot), "has no <|endoftext|> token"),
        "gaps in the ids": (json.dumps(gaps), "ids are not 0.."),
        "unloadable": (json.dumps({**good, "model": {"type": "BPE", "vocab": "x"}}), "cannot be loaded by tokenizers"),
    }


def test_bad_tokenizer_folders(tmp_path, corpus, capsys):
    assert run_guarded(TRAIN, [str(corpus), "--vocab_size", "300", "--out", str(tmp_path / "good")]) == 0
    good = json.loads((tmp_path / "good" / "tokenizer.json").read_text())
    capsys.readouterr()
    out = ["--out", tmp_path / "data", "--tokenizer"]
    one_error(capsys, PREPARE, [corpus, *out, tmp_path / "none"], tmp_path, "is neither a tokenizer name")
    (tmp_path / "empty").mkdir()
    one_error(capsys, PREPARE, [corpus, *out, tmp_path / "empty"], tmp_path, "tokenizer.json not found")
    for name, (text, fragment) in tokenizer_variants(good).items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(text)
        one_error(capsys, PREPARE, [corpus, *out, tmp_path / name], tmp_path, fragment)
