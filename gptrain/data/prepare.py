"""Turn text into a token dataset folder: train.bin and val.bin (raw ids) and meta.json.

Inputs are whatever readers.py reads: text files and folders of them (each file one document), .jsonl files
(each line one document), Parquet files and Hugging Face datasets (each row one document). The work streams in
two passes, so memory stays flat however large the corpus: a scan (counts, the character set, and every
decoding or format error, before anything is written), then tokenisation in parallel worker processes with the
ids appended to the .bin files as they come.

The validation split takes whole documents, chosen by a seeded draw. A corpus of a single document (one text
file, like Tiny Shakespeare) is split by position instead: the first (1 - val_fraction) of its characters
train, the rest validate.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptrain.data.readers import Piece, ReadOptions, Source, expand_inputs, iter_pieces, size_estimate
from gptrain.data.tokenizer import TOKEN_DTYPES, meta_fields, open_tokenizer, smallest_token_dtype, tokenizer_from_meta
from gptrain.errors import UserError
from gptrain.runtime import names, outdir
from gptrain.runtime.files import kind_of
from gptrain.runtime.publish import Stage, staged
from gptrain.runtime.signals import signals_deferred

WORK_CHARS = 1 << 20  # characters per task handed to a worker process
# Tiny Shakespeare (Karpathy's char-rnn corpus, 1.1 MB), shipped so that the quick start works offline anywhere.
TINY_SHAKESPEARE = Path(str(resources.files("gptrain") / "assets" / "tinyshakespeare.txt"))


@dataclass
class Scan:
    documents: int = 0
    characters: int = 0
    bytes: int = 0
    charset: set = field(default_factory=set)


def scan(sources: list[Source], options: ReadOptions, want_charset: bool) -> Scan:
    result = Scan()
    sizes = [size_estimate(source, options) for source in sources]
    total = None if None in sizes else sum(sizes)
    with tqdm(total=total, unit="B", unit_scale=True, desc="scanning", delay=1.0, leave=False) as bar:
        for piece in iter_pieces(sources, options):
            result.characters += len(piece.text)
            size = len(piece.text.encode("utf-8"))
            result.bytes += size
            bar.update(size)
            if want_charset:
                result.charset.update(piece.text)
            if piece.last:
                result.documents += 1
    return result


# ----- tokenising ---------------------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_meta: dict) -> None:
    """tokenizer_meta: the tokenizer's fields of meta.json, from which each worker rebuilds it."""
    global _worker_tokenizer
    # Ctrl-C reaches every process of the terminal's group: the main process handles it and cleans up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_tokenizer = tokenizer_from_meta(tokenizer_meta)


def _encode_pieces(texts: list[tuple[str, bool]], dtype: str) -> tuple[list[np.ndarray], int]:
    """In a worker: ids for each piece, with <|endoftext|> after a document's last piece (BPE only), and the
    number of bytes of text they cover (for the progress bar)."""
    tokenizer = _worker_tokenizer
    out = []
    for text, last in texts:
        ids = tokenizer.encode_array(text, dtype)
        if last and tokenizer.eot_token is not None:
            ids = np.append(ids, np.array([tokenizer.eot_token], dtype=dtype))
        out.append(ids)
    return out, sum(len(text.encode("utf-8")) for text, _ in texts)


def _work_units(pieces: Iterator[Piece], route) -> Iterator[tuple[list[tuple[str, bool]], list[str]]]:
    """Group pieces into tasks of about WORK_CHARS characters; route(piece) names the split of each part."""
    texts, splits, size = [], [], 0
    for piece in pieces:
        for split, text, last in route(piece):
            texts.append((text, last))
            splits.append(split)
            size += len(text)
        if size >= WORK_CHARS:
            yield texts, splits
            texts, splits, size = [], [], 0
    if texts:
        yield texts, splits


class Router:
    """Which split each piece belongs to: whole documents, or (one document) a cut by character position."""

    def __init__(self, scan_result: Scan, val_fraction: float, seed: int):
        self.by_position = scan_result.documents == 1
        if self.by_position:
            self.cut = int(scan_result.characters * (1.0 - val_fraction))
            self.seen = 0
        else:
            count = max(1, round(scan_result.documents * val_fraction))
            if count >= scan_result.documents:
                raise UserError(f"val_fraction {val_fraction} leaves no training documents out of "
                                f"{scan_result.documents}; lower it or add documents")
            chosen = np.random.default_rng(seed).choice(scan_result.documents, size=count, replace=False)
            self.val_docs = set(chosen.tolist())

    def __call__(self, piece: Piece) -> list[tuple[str, str, bool]]:
        """(split, text, ends a document) for the parts of a piece. A single document cut by position gets no
        <|endoftext|>: each split is a stretch of one text, encoded as nanoGPT does."""
        if not self.by_position:
            return [("val" if piece.doc in self.val_docs else "train", piece.text, piece.last)]
        start, self.seen = self.seen, self.seen + len(piece.text)
        if self.seen <= self.cut:
            return [("train", piece.text, False)]
        if start >= self.cut:
            return [("val", piece.text, False)]
        split_at = self.cut - start
        return [("train", piece.text[:split_at], False), ("val", piece.text[split_at:], False)]


def describe(meta: dict, out_dir: Path, unchanged: bool = False) -> str:
    """What a prepare script prints when it is done."""
    return (f"{meta['documents']:,} documents, {meta['characters']:,} characters ({meta['split']} split)\n"
            f"tokenizer {meta['tokenizer']}, vocab size {meta['vocab_size']:,} ({meta['dtype']})\n"
            f"train has {meta['train_tokens']:,} tokens, val has {meta['val_tokens']:,} tokens\n"
            + (f"{out_dir} already held this dataset, byte for byte: left unchanged" if unchanged
               else f"wrote {out_dir}/train.bin, val.bin, meta.json"))


def prepare_dataset(inputs: list[Path], out_dir: Path, tokenizer_name: str = "char", **options) -> dict:
    """Prepare `inputs` into out_dir (see prepare()); returns the dataset's meta.json."""
    return prepare(inputs, out_dir, tokenizer_name, **options)[0]


def prepare(
    inputs: list[Path],
    out_dir: Path,
    tokenizer_name: str = "char",
    val_fraction: float = 0.1,
    workers: int = 1,
    seed: int = 1337,
    text_field: str = "text",
    errors: str = "strict",
    dtype: str = "auto",
    overwrite: bool = False,
    split: str = "train",
) -> tuple[dict, bool]:
    """Prepare `inputs` into out_dir; returns meta.json's content and whether out_dir already held exactly this
    dataset (then nothing was written). An out_dir holding a different dataset, a run or an exported model is
    refused unless `overwrite`. A failed preparation leaves out_dir as it found it. `split` is the split read
    from a Hugging Face dataset with several."""
    _check_options(val_fraction, workers, seed)
    outdir.check_creatable(out_dir, "--out")
    sources, options = expand_inputs(inputs), ReadOptions(text_field, errors, split)
    found = scan(sources, options, want_charset=tokenizer_name == "char")
    if found.characters == 0:
        raise UserError(f"no text in {', '.join(map(str, inputs))}; give files with some text in them")
    tokenizer = open_tokenizer(tokenizer_name, found.charset, found.documents)
    dtype = _token_dtype(tokenizer.vocab_size, dtype)
    router = Router(found, val_fraction, seed)
    meta = _dataset_meta(tokenizer, dtype, found, router)
    with outdir.claimed(out_dir, "--out"):
        keep_existing = check_existing(out_dir, meta, overwrite)
        tokenizer_meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, **meta_fields(tokenizer)}
        with staged(out_dir, names.GPTRAIN_OUTPUT) as stage:
            max_id = _tokenize_to_files(sources, options, stage.path, router, tokenizer_meta, dtype, workers, found)
            for split in ("train", "val"):
                meta[f"{split}_tokens"] = (stage.path / f"{split}.bin").stat().st_size // np.dtype(dtype).itemsize
            meta["max_token_id"] = max_id
            publish_or_verify(stage, meta, keep_existing)
    return meta, keep_existing


def publish_or_verify(stage: Stage, meta: dict, keep_existing: bool) -> None:
    """Publish the staged splits with meta.json, or, when the target already holds this dataset, check that the
    new files are identical to it (a rerun of the same command leaves the folder unchanged)."""
    stage.write("meta.json", json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8"))
    if not keep_existing:
        stage.publish()
    elif not stage.holds_the_target():
        raise UserError(f"{stage.target} already holds a different dataset (same sizes, other tokens); choose "
                        "another --out, or pass --overwrite to replace it")


def _check_options(val_fraction: float, workers: int, seed: int) -> None:
    if not 0.0 < val_fraction < 1.0:  # also refuses nan
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    most = 4 * (os.cpu_count() or 1)
    if not 1 <= workers <= most:  # thousands of processes would exhaust memory before tokenising anything
        raise UserError(f"--workers must be between 1 and {most} (4 per CPU core), got {workers}")
    if not 0 <= seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {seed}")


def _dataset_meta(tokenizer, dtype: str, found: Scan, router: Router) -> dict:
    """meta.json's content, the token counts still to be filled in (the key order is part of the bytes)."""
    fields = meta_fields(tokenizer)
    # Your own tokenizer's JSON is one very long line: it goes last, below the figures a reader looks for.
    carried = {"tokenizer_json": fields.pop("tokenizer_json")} if "tokenizer_json" in fields else {}
    return {
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        **fields,
        "train_tokens": None,  # counted while tokenising
        "val_tokens": None,
        "max_token_id": None,  # lets training check the ids without reading the .bin files
        "characters": found.characters,
        "documents": found.documents,
        "split": "by position" if router.by_position else "by document",
        **carried,
    }


# What must match for a dataset already in out_dir to be possibly the same; compared before tokenising.
SAME_DATASET_KEYS = ("tokenizer", "vocab_size", "tokenizer_sha256", "dtype", "characters", "documents", "split")


def check_existing(out_dir: Path, meta: dict, overwrite: bool) -> bool:
    """True when out_dir holds a dataset that the new one must equal byte for byte (no --overwrite)."""
    outdir.refuse_folders_in_the_way(out_dir)
    found = outdir.holdings(out_dir)
    if not found or overwrite:
        return False
    if set(found) != {"dataset"}:
        outdir.refuse_unless_overwrite(out_dir, overwrite)
    old = _existing_meta(out_dir / "meta.json")
    differs = [k for k in SAME_DATASET_KEYS if old.get(k) != meta.get(k)]
    if differs:
        what = ", ".join(f"{k} {old.get(k)!r} -> {meta.get(k)!r}" for k in differs)
        raise UserError(f"{out_dir} already holds a different dataset ({what}); choose another --out, or pass "
                        "--overwrite to replace it")
    return True


def _existing_meta(path: Path) -> dict:
    data = _existing_bytes(path)
    try:
        value = json.loads(data.decode("utf-8")) if data is not None else None
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _existing_bytes(path: Path) -> bytes | None:
    """A regular file's bytes; None for anything else (a device such as /dev/zero would never end)."""
    if path.is_symlink() or kind_of(path) != "file":
        return None
    try:
        return path.read_bytes()
    except OSError:
        return None


def _token_dtype(vocab_size: int, requested: str) -> str:
    if requested == "auto":
        return smallest_token_dtype(vocab_size)
    if requested not in TOKEN_DTYPES:
        raise UserError(f"--dtype must be auto or one of {', '.join(TOKEN_DTYPES)}, got {requested!r}")
    if vocab_size - 1 > np.iinfo(requested).max:
        raise UserError(f"a vocabulary of {vocab_size} ids does not fit {requested}; use --dtype auto or "
                        f"{smallest_token_dtype(vocab_size)}")
    return requested


def _tokenize_to_files(sources, options, folder, router, tokenizer_meta, dtype, workers, found) -> int:
    """Tokenise in worker processes, at most 2 tasks per worker in flight (memory stays flat), writing the ids
    in order to folder/train.bin and val.bin; returns the largest id written."""
    counts = {"train": 0, "val": 0, "max_id": 0}
    with open(folder / "train.bin", "wb") as train, open(folder / "val.bin", "wb") as val, \
            worker_pool(workers, tokenizer_meta) as pool, \
            tqdm(total=found.bytes, unit="B", unit_scale=True, desc="tokenizing", delay=1.0) as bar:
        files_out = {"train": train, "val": val}
        pending = deque()
        for texts, splits in _work_units(iter_pieces(sources, options), router):
            pending.append((pool.submit(_encode_pieces, texts, dtype), splits))
            if len(pending) >= 2 * workers:
                _write_result(pending.popleft(), files_out, counts, bar)
        while pending:
            _write_result(pending.popleft(), files_out, counts, bar)
    for split in ("train", "val"):
        if counts[split] == 0:
            raise UserError(f"the {split} split came out empty; use more text or another val_fraction")
    return counts["max_id"]


@contextlib.contextmanager
def worker_pool(workers: int, tokenizer_meta: dict) -> Iterator[ProcessPoolExecutor]:
    """Tokenizer processes that end with the block however it ends. They start and stop with signals held back
    (a Ctrl-C landing in the middle of either would leave processes no one ends), and an interrupted preparation
    drops the tasks not yet started."""
    pool = None
    try:
        with signals_deferred():  # a signal held back here lands at the end of this block, inside the try
            pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer_meta,))
            pool.submit(int).result()  # starts the processes and the pool's thread now, not at some later submit
        yield pool
    finally:
        try:
            stop_workers(pool)
        finally:  # again: a signal can land as the first call begins, before it holds signals back
            stop_workers(pool)


def stop_workers(pool: ProcessPoolExecutor | None) -> None:
    if pool is not None:
        with signals_deferred():
            pool.shutdown(wait=True, cancel_futures=True)


def _write_result(task, files_out, counts, bar) -> None:
    future, splits = task
    try:
        arrays, nbytes = future.result()
    except BrokenProcessPool:
        raise UserError("a tokenizer process died (killed by the system: out of memory?); use fewer --workers, or "
                        "split the input into smaller files") from None
    for ids, split in zip(arrays, splits):
        ids.tofile(files_out[split])
        counts[split] += int(ids.size)
        if ids.size:
            counts["max_id"] = max(counts["max_id"], int(ids.max()))
    bar.update(nbytes)
