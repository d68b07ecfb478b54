"""Parquet files and Hugging Face datasets as inputs: each row one document, the same tokens and the same meta.json
as the same documents in a .jsonl file (with GPT-2's BPE and with your own), read a batch of rows at a time; bad
files of these formats are one-line errors naming the file."""

import glob
import json
import os

import pytest

from gptrain.data import arrow_input
from gptrain.data.bpe_training import train_tokenizer
from gptrain.data.prepare import prepare_dataset
from gptrain.data.readers import ReadOptions
from gptrain.errors import UserError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def docs(shakespeare_text):
    """60 documents of varied length and script, one of them empty (skipped, as in .jsonl)."""
    lines = shakespeare_text.splitlines()
    found = [" ".join(lines[i * 7: i * 7 + 1 + i % 9]) for i in range(55)]
    return [*found, "", "日本語のテキスト、中文文本。", "Ελληνικά и русский", "emoji 👩\u200d💻 ok", "e\u0301 \t tabs"]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_parquet(path, docs, row_group_size=7, compression="snappy"):
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path, row_group_size=row_group_size,
                   compression=compression)
    return path


def cache_dataset(cache_dir, name, splits: dict):
    """Leave NAME in a datasets cache as load_dataset leaves a downloaded dataset (NAME/default/VERSION/HASH/
    holding dataset_info.json and one .arrow file per split), without a network: the Parquet builder does the
    writing, as it does for a dataset of Parquet files on the Hub."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    source = cache_dir / "source"
    source.mkdir(parents=True)
    files = {split: [str(write_parquet(source / f"{split}.parquet", texts))] for split, texts in splits.items()}
    builder = Parquet(cache_dir=str(cache_dir), dataset_name=name, hash="0123abcd", config_name="default",
                      data_files=DataFilesDict.from_patterns(files))
    builder.download_and_prepare()
    [config_dir] = glob.glob(str(cache_dir / name / "default-*"))
    os.rename(config_dir, cache_dir / name / "default")  # a Hub dataset's config has no data-files suffix


def prepared(folder):
    meta = (folder / "meta.json").read_bytes()
    return meta, (folder / "train.bin").read_bytes(), (folder / "val.bin").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, docs):
    """The documents as .jsonl, prepared with GPT-2's BPE and with a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("ref")
    jsonl = write_jsonl(root / "docs.jsonl", docs)
    train_tokenizer([jsonl], root / "tok", vocab_size=400)
    for tokenizer in ("gpt2", str(root / "tok")):
        prepare_dataset([jsonl], root / f"jsonl-{os.path.basename(tokenizer)}", tokenizer, val_fraction=0.2)
    return root


@pytest.mark.parametrize("tokenizer", ["gpt2", "tok"])
def test_parquet_gives_the_tokens_of_the_same_jsonl(tmp_path, docs, reference, monkeypatch, tokenizer):
    monkeypatch.setattr(arrow_input, "BATCH_ROWS", 5)  # batches that straddle the row groups of 7
    choice = "gpt2" if tokenizer == "gpt2" else str(reference / "tok")
    write_parquet(tmp_path / "docs.parquet", docs)
    prepare_dataset([tmp_path / "docs.parquet"], tmp_path / "out", choice, val_fraction=0.2, workers=2)
    assert prepared(tmp_path / "out") == prepared(reference / f"jsonl-{tokenizer}")


def test_a_folder_of_parquet_files_reads_them_in_name_order(tmp_path, docs, reference):
    (tmp_path / "shards" / "b").mkdir(parents=True)
    write_parquet(tmp_path / "shards" / "a-000.parquet", docs[:20])
    write_parquet(tmp_path / "shards" / "b" / "part.parquet", docs[20:], row_group_size=100)
    prepare_dataset([tmp_path / "shards"], tmp_path / "out", "gpt2", val_fraction=0.2)
    assert prepared(tmp_path / "out") == prepared(reference / "jsonl-gpt2")


@pytest.mark.parametrize("tokenizer", ["gpt2", "tok"])
def test_saved_datasets_give_the_tokens_of_the_same_jsonl(tmp_path, docs, reference, tokenizer):
    choice = "gpt2" if tokenizer == "gpt2" else str(reference / "tok")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    prepare_dataset([tmp_path / "saved"], tmp_path / "one", choice, val_fraction=0.2)
    assert prepared(tmp_path / "one") == prepared(reference / f"jsonl-{tokenizer}")
    both = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["other"] * 3}),
                                 "web": datasets.Dataset.from_dict({"text": docs})})
    both.save_to_disk(str(tmp_path / "dict"))
    prepare_dataset([tmp_path / "dict"], tmp_path / "split", choice, val_fraction=0.2, split="web")
    assert prepared(tmp_path / "split") == prepared(reference / f"jsonl-{tokenizer}")


def test_a_cached_dataset_is_read_offline_by_name(tmp_path, docs, reference, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    cache_dataset(tmp_path / "cache", "tiny_docs", {"train": docs, "test": docs[:5]})
    prepare_dataset(["hf:tiny_docs"], tmp_path / "out", "gpt2", val_fraction=0.2)
    assert prepared(tmp_path / "out") == prepared(reference / "jsonl-gpt2")
    meta = prepare_dataset(["hf:tiny_docs:default"], tmp_path / "test", "gpt2", split="test", val_fraction=0.2)
    assert meta["documents"] == 5
    with pytest.raises(UserError, match=r"hf:not_downloaded is not in the local cache .*reads datasets offline"):
        prepare_dataset(["hf:someone/not_downloaded".replace("someone/", "")], tmp_path / "x", "gpt2")
    with pytest.raises(UserError, match=r"hf:tiny_docs: .*Unknown split.*choose the split with --split"):
        prepare_dataset(["hf:tiny_docs"], tmp_path / "x", "gpt2", split="validation")


def test_the_tokenizer_trains_on_the_same_texts_from_every_format(tmp_path, docs, reference):
    """.jsonl, Parquet, a saved dataset and a folder of text files (a document each) give one tokenizer.json."""
    write_parquet(tmp_path / "docs.parquet", docs)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "texts").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "texts" / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    expected = (reference / "tok" / "tokenizer.json").read_text()
    for source in ("docs.parquet", "saved", "texts"):
        train_tokenizer([tmp_path / source], tmp_path / f"tok-{source}", vocab_size=400)
        assert (tmp_path / f"tok-{source}" / "tokenizer.json").read_text() == expected, source


# ----- bad inputs -------------------------------------------------------------------------------------------------


def refused(tmp_path, inputs, match, **options):
    with pytest.raises(UserError, match=match) as caught:
        prepare_dataset(inputs, tmp_path / "out", "gpt2", **options)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder
    return str(caught.value)


def test_a_missing_or_non_text_column_is_named(tmp_path, docs):
    path = write_parquet(tmp_path / "t.parquet", docs)
    message = refused(tmp_path, [path], r"t.parquet has no column 'content' \(it has text, id\)", text_field="content")
    assert "--text_field" in message
    refused(tmp_path, [path], r"t.parquet: column 'id' holds int64, not text; name the column", text_field="id")
    lists = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"text": [["a", "b"]] * 3}), lists)
    refused(tmp_path, [lists], "column 'text' holds list<element: string>, not text")
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))
    refused(tmp_path, [tmp_path / "saved"], r"saved has no column 'text' \(it has body\)")


def test_a_null_row_is_named(tmp_path, docs):
    path = write_parquet(tmp_path / "n.parquet", [*docs[:9], None, *docs[10:]])
    refused(tmp_path, [path], r"n.parquet: row 10 has no text \(text is null\)")


def test_text_that_is_not_utf8_is_named_or_replaced(tmp_path):
    path = tmp_path / "b.parquet"
    texts = pa.array([b"good text", b"bad \xff byte"], pa.binary()).view(pa.string())  # not checked: as found
    pq.write_table(pa.table({"text": texts}), path)
    refused(tmp_path, [path], r"b.parquet: row 2: byte 4 of its text is not UTF-8; fix it or pass --errors replace")
    meta = prepare_dataset([path], tmp_path / "ok", "char", errors="replace", val_fraction=0.5)
    assert "\ufffd" in meta["itos"]


def test_damaged_parquet_files_are_named(tmp_path, docs):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 10)
    refused(tmp_path, [garbage], r"garbage.parquet is not a Parquet file pyarrow can read \(.*\); write it again")
    whole = write_parquet(tmp_path / "whole.parquet", docs * 20, row_group_size=50, compression="none")
    data = bytearray(whole.read_bytes())
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    refused(tmp_path, [truncated], r"truncated.parquet is not a Parquet file pyarrow can read")
    data[100:2000] = b"\xee" * 1900  # a damaged data page, the footer intact: found only when that page is read
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(bytes(data))
    refused(tmp_path, [damaged], r"damaged.parquet is damaged: .*; write it again")


def test_empty_tables_are_no_text(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    refused(tmp_path, [empty], r"no text in .*empty.parquet")
    datasets.Dataset.from_dict({"text": ["", ""]}).save_to_disk(str(tmp_path / "blank"))
    refused(tmp_path, [tmp_path / "blank"], r"no text in .*blank")


def test_bad_saved_datasets_are_named(tmp_path, docs):
    both = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})})
    both.save_to_disk(str(tmp_path / "dict"))
    refused(tmp_path, [tmp_path / "dict"], r"dict has no split 'test' \(it has train\); choose one with --split",
            split="test")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{not json")
    refused(tmp_path, [tmp_path / "broken"], r"broken cannot be read by datasets.load_from_disk .*save the dataset")


@pytest.mark.parametrize("module, extra", [("pyarrow", "parquet"), ("datasets", "datasets")])
def test_a_missing_library_names_its_extra(tmp_path, monkeypatch, docs, module, extra):
    path = write_parquet(tmp_path / "t.parquet", docs)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setitem(__import__("sys").modules, module, None)  # `import module` now raises ImportError
    refused(tmp_path, [path if module == "pyarrow" else tmp_path / "saved"], rf"pip install 'gptrain\[{extra}\]'")


def test_the_progress_total_comes_from_the_parquet_footer(tmp_path, docs):
    path = write_parquet(tmp_path / "t.parquet", docs, compression="none")
    size = arrow_input.parquet_text_bytes(path, "text")
    assert sum(len(d.encode()) for d in docs) <= size <= 2 * sum(len(d.encode()) for d in docs) + 1000
    assert arrow_input.parquet_text_bytes(path, "nothing") is None
    assert list(arrow_input.parquet_texts(path, ReadOptions())) == docs
