import json
import os

import numpy as np
import pytest
import torch
from conftest import prepare_text

from gptrain.data.dataset import BatchSampler, TokenFile, load_meta, open_split
from gptrain.data.tokenizer import smallest_token_dtype
from gptrain.errors import UserError


def test_shakespeare_reference_figures(tmp_path, shakespeare_text):
    meta = prepare_text(shakespeare_text, tmp_path)
    assert meta["characters"] == 1_115_394
    assert meta["vocab_size"] == 65
    assert meta["train_tokens"] == 1_003_854 and meta["val_tokens"] == 111_540
    assert meta["dtype"] == "uint8"
    assert (tmp_path / "train.bin").stat().st_size == 1_003_854


def test_small_text_round_trips_through_the_bins(tmp_path):
    text = "hello world, hello gptrain!\n" * 10
    meta = prepare_text(text, tmp_path)
    assert meta["itos"] == sorted(set(text)) and meta["vocab_size"] == len(set(text))
    assert meta["stoi"] == {ch: i for i, ch in enumerate(meta["itos"])}
    assert meta["train_tokens"] == int(len(text) * 0.9) and meta["val_tokens"] == len(text) - int(len(text) * 0.9)
    ids = np.fromfile(tmp_path / "train.bin", dtype=meta["dtype"]).tolist()
    assert "".join(meta["itos"][i] for i in ids) == text[: meta["train_tokens"]]
    assert json.loads((tmp_path / "meta.json").read_text()) == meta


@pytest.mark.parametrize("vocab, dtype", [(2, "uint8"), (256, "uint8"), (257, "uint16"), (65536, "uint16"),
                                          (65537, "uint32"), (50257, "uint16")])
def test_smallest_token_dtype(vocab, dtype):
    assert smallest_token_dtype(vocab) == dtype


def test_non_ascii_vocabulary_uses_uint16_when_needed(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 3
    meta = prepare_text(text, tmp_path)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    ids = np.fromfile(tmp_path / "val.bin", dtype="uint16")
    assert "".join(meta["itos"][i] for i in ids) == text[meta["train_tokens"]:]


def test_batches_are_windows_shifted_by_one(tmp_path):
    ids = np.arange(1000, dtype=np.uint16)
    ids.tofile(tmp_path / "train.bin")
    sampler = BatchSampler(TokenFile(tmp_path / "train.bin", "uint16", 2**16), 6, 16, 0, torch.device("cpu"))
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(6, 15, dtype=torch.long))  # contiguous windows
    assert torch.equal(y, x + 1)
    assert int(y.max()) <= 999


def test_sampler_state_restores_the_same_batches_despite_prefetch(tmp_path):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    tokens = TokenFile(tmp_path / "train.bin", "uint16", 2**16)
    sampler = BatchSampler(tokens, 4, 8, 7, torch.device("cpu"))
    sampler.next_batch()
    sampler.prefetch()  # drawn but not yet used
    state = json.loads(json.dumps(sampler.state_dict()))  # must be JSON-able
    expected = [sampler.next_batch()[0] for _ in range(3)]
    resumed = BatchSampler(tokens, 4, 8, 999, torch.device("cpu"))
    resumed.load_state_dict(state)
    for batch in expected:
        assert torch.equal(resumed.next_batch()[0], batch)


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc (Linux)")
def test_memory_does_not_grow_with_batches_drawn(tmp_path):
    path = tmp_path / "train.bin"
    np.random.default_rng(0).integers(0, 60000, size=40_000_000, dtype=np.uint16).tofile(path)  # 80 MB
    sampler = BatchSampler(TokenFile(path, "uint16", 2**16), 64, 64, 0, torch.device("cpu"))
    before = _rss_kib()
    for _ in range(400):  # 25,600 random windows touch most of the file's 20k pages
        sampler.next_batch()
    assert _rss_kib() - before < 20_000  # KiB; keeping the pages mapped would add up to ~80 MB


def test_bad_files_give_user_errors(tmp_path):
    with pytest.raises(UserError, match="meta.json is missing"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"vocab_size": 65, "dtype": "uint16", "tokenizer": "gpt2"}')
    (tmp_path / "train.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(UserError, match="not a multiple of 2"):
        open_split(tmp_path, "train", "uint16", 65)
    with pytest.raises(UserError, match="val.bin is missing"):
        open_split(tmp_path, "val", "uint16", 65)


def test_start_up_reads_a_split_and_trusts_only_a_large_ones_record(tmp_path, shakespeare_text, monkeypatch):
    """A split up to SCAN_LIMIT_BYTES is read at start-up, so an id changed after preparation (meta.json unchanged)
    is caught before training; a larger one whose length matches meta.json is judged by the recorded largest id."""
    from conftest import prepare_text

    from gptrain.data import dataset as data

    meta = prepare_text(shakespeare_text[:20_000], tmp_path / "d")
    ids = np.fromfile(tmp_path / "d" / "train.bin", dtype=meta["dtype"])
    assert meta["max_token_id"] == max(int(ids.max()), int(np.fromfile(tmp_path / "d" / "val.bin",
                                                                        dtype=meta["dtype"]).max()))
    ids[1234] = meta["vocab_size"]
    ids.tofile(tmp_path / "d" / "train.bin")
    tokens = data.open_split(tmp_path / "d", "train", meta["dtype"], meta["vocab_size"])
    with pytest.raises(UserError, match=f"token id {meta['vocab_size']} at position 1234"):
        data.check_token_range(tokens, meta)
    scanned = []
    monkeypatch.setattr(data, "scan_token_range", lambda tokens: scanned.append(tokens.path.name))
    monkeypatch.setattr(data, "SCAN_LIMIT_BYTES", 0)  # as if the split were large
    data.check_token_range(tokens, meta)
    assert scanned == []
    data.check_token_range(tokens, {**meta, "max_token_id": None})
    data.check_token_range(tokens, {**meta, "train_tokens": 5})  # another length: read it
    assert scanned == ["train.bin", "train.bin"]
    with pytest.raises(UserError, match="max_token_id"):
        data.check_token_range(tokens, {**meta, "max_token_id": meta["vocab_size"]})


def test_the_sampler_catches_a_file_changed_after_preparation(tmp_path, shakespeare_text):
    from conftest import prepare_text

    from gptrain.data import dataset as data

    meta = prepare_text(shakespeare_text[:5_000], tmp_path / "d")
    ids = np.fromfile(tmp_path / "d" / "train.bin", dtype=meta["dtype"])
    ids[:] = 250  # every id out of range, so the first batch meets one
    ids.tofile(tmp_path / "d" / "train.bin")
    tokens = data.open_split(tmp_path / "d", "train", meta["dtype"], meta["vocab_size"])
    sampler = data.BatchSampler(tokens, 4, 16, 0, torch.device("cpu"))
    with pytest.raises(UserError, match="token id 250 at position"):
        sampler.next_batch()
