"""Turn a text into a token dataset folder: train.bin and val.bin (raw ids) and meta.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptrain.data import smallest_token_dtype
from gptrain.errors import UserError
from gptrain.tokenizer import CharTokenizer

CHUNK_CHARS = 1 << 22


def split_by_position(text: str, val_fraction: float) -> tuple[str, str]:
    """The first (1 - val_fraction) of the characters train, the rest validate."""
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def encode_chars(text: str, tokenizer: CharTokenizer, dtype: str, desc: str = "encoding") -> np.ndarray:
    """Vectorised lookup: code point -> id through a table, instead of a Python loop per character."""
    table = np.zeros(max(map(ord, tokenizer.itos)) + 1, dtype=dtype)
    for i, ch in enumerate(tokenizer.itos):
        table[ord(ch)] = i
    chunks = []
    # The bar only appears when encoding takes over a second (a corpus of hundreds of MB).
    for start in tqdm(range(0, len(text), CHUNK_CHARS), desc=desc, unit="chunk", delay=1.0, leave=False):
        codepoints = np.frombuffer(text[start:start + CHUNK_CHARS].encode("utf-32-le"), dtype=np.uint32)
        chunks.append(table[codepoints])
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def prepare_char_dataset(text: str, out_dir: Path, val_fraction: float = 0.1) -> dict:
    """Character-level dataset: the vocabulary is every distinct character of the whole text."""
    if not text:
        raise UserError("the input text is empty; give a file with some text in it")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    tokenizer = CharTokenizer.from_text(text)
    dtype = smallest_token_dtype(tokenizer.vocab_size)
    train_text, val_text = split_by_position(text, val_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, part in (("train", train_text), ("val", val_text)):
        ids = encode_chars(part, tokenizer, dtype, desc=f"encoding {split}")
        write_atomically(out_dir / f"{split}.bin", ids.tobytes())
        counts[f"{split}_tokens"] = int(ids.size)
    meta = {
        "tokenizer": "char",
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        "itos": tokenizer.itos,
        "stoi": tokenizer.stoi,
        **counts,
        "characters": len(text),
    }
    write_atomically(out_dir / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8"))
    return meta


def write_atomically(path: Path, payload: bytes) -> None:
    """Write beside the target, then rename over it: readers see the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
