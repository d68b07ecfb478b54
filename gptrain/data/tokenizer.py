"""Tokenizers named by a dataset's meta.json: character level (the maps live in meta.json), BPE via tiktoken, your
own BPE (hf_bpe.py: its whole tokenizer.json lives in meta.json) or a Hugging Face model's own tokenizer
(model_tokenizer.py: its tokenizer.json, special tokens, end tokens and chat template live in meta.json), and the
integer types their ids are stored in. Free of torch, so data preparation starts fast and stays small.

GPT-2's BPE ranks ship with the package (gptrain/assets/r50k_base.tiktoken, checked against its published
sha256), so "gpt2" and "r50k_base" work on machines without internet. Other tiktoken encodings are loaded by
name, which needs tiktoken's download or cache.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from gptrain.data.chat import (
    ChatTokenizer,
    adds_chat_tokens,
    base_meta,
    base_vocab_size,
    check_chat_block,
    check_preference_fields,
)
from gptrain.data.hf_bpe import (
    ENDOFTEXT,
    OWN_BPE,
    OwnBPETokenizer,
    own_tokenizer_from_meta,
    read_own_tokenizer,
    sha256_text,
)
from gptrain.data.model_tokenizer import HF, HFTokenizer, hf_fields, hf_tokenizer_from_meta, validate_hf_tokenizer
from gptrain.errors import UserError, one_line

GPT2_RANKS_FILE = "r50k_base.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation pattern, as tiktoken_ext.openai_public defines it for gpt2 and r50k_base.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
OFFLINE_ENCODINGS = ("gpt2", "r50k_base")  # the same 50,257-token vocabulary
TOKEN_DTYPES = ("uint8", "uint16", "uint32")  # how token ids are stored on disk


def smallest_token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned integer type that holds every id in 0..vocab_size-1."""
    for name in TOKEN_DTYPES:
        if vocab_size - 1 <= np.iinfo(name).max:
            return name
    raise UserError(f"a vocabulary of {vocab_size} ids does not fit in uint32")


# What separates the documents of a character-level dataset, as <|endoftext|> does with BPE: the Unicode symbol
# for ASCII's End of Text, visible in samples and a plain character everywhere else (an export's tokenizer).
CHAR_END_OF_TEXT = "\u2403"


class CharTokenizer:
    name = "char"

    def __init__(self, itos: list[str], eot_token: int | None = None):
        self.itos = itos
        self.stoi = {ch: i for i, ch in enumerate(itos)}
        self.eot_token = eot_token  # CHAR_END_OF_TEXT's id in a dataset of several documents, else None
        self._table = None  # code point -> id, built on first use

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise UserError(f"characters {''.join(unknown)!r} are not in this model's vocabulary; use others")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids)

    def encode_array(self, text: str, dtype: str) -> np.ndarray:
        """Vectorised encode for data preparation: code point -> id through a lookup table."""
        if self._table is None:
            self._table = np.full(max(map(ord, self.itos)) + 1, -1, dtype=np.int64)
            self._table[[ord(ch) for ch in self.itos]] = np.arange(len(self.itos))
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if codepoints.size and (codepoints.max() >= self._table.size or (self._table[codepoints] < 0).any()):
            self.encode(text)  # raises, naming the unknown characters
        return self._table[codepoints].astype(dtype)

    def token_bytes(self, token: int) -> bytes:
        return self.itos[token].encode("utf-8")


class BPETokenizer:
    def __init__(self, name: str):
        self.name = name
        self.encoding = load_encoding(name)
        self.eot_token = self.encoding.eot_token

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)  # text is data: "<|endoftext|>" in it is not special

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def encode_array(self, text: str, dtype: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=dtype)

    def token_bytes(self, token: int) -> bytes:
        """A BPE token may hold part of a UTF-8 character: stream bytes, not strings."""
        return self.encoding.decode_single_token_bytes(token)


@cache
def load_encoding(name: str):
    import tiktoken

    if name in OFFLINE_ENCODINGS:
        return gpt2_encoding(name)
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # ValueError for unknown names, network errors when it must download
        raise UserError(f"cannot load the tiktoken encoding {name!r} ({one_line(exc)}); gpt2 works offline, char "
                        "needs no encoding") from None


def gpt2_encoding(name: str = "gpt2"):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    with resources.as_file(resources.files("gptrain") / "assets" / GPT2_RANKS_FILE) as path:
        if not path.is_file():
            raise UserError(f"{path} is missing from the installation; reinstall gptrain")
        if hashlib.sha256(path.read_bytes()).hexdigest() != GPT2_RANKS_SHA256:
            raise UserError(f"{path} does not match GPT-2's published sha256 (the file is damaged); reinstall gptrain")
        ranks = load_tiktoken_bpe(str(path))
    return tiktoken.Encoding(
        name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


def known_tokenizers() -> tuple[str, ...]:
    """Every name a dataset may record: characters, GPT-2's BPE (offline), your own BPE, a Hugging Face model's
    tokenizer and tiktoken's encodings."""
    import tiktoken

    return ("char", *OFFLINE_ENCODINGS, OWN_BPE, HF, *tiktoken.list_encoding_names())


def load_tokenizer(name: str, itos: list[str] | None = None, eot_token: int | None = None):
    if name == "char":
        if itos is None:
            raise UserError("a character-level tokenizer needs its vocabulary (itos in meta.json)")
        return CharTokenizer(itos, eot_token)
    return BPETokenizer(name)


def open_tokenizer(choice: str, charset: set[str] | None = None, documents: int = 1):
    """prepare's --tokenizer: char (over `charset`, the text's characters, with CHAR_END_OF_TEXT between documents
    when there are several), a tiktoken encoding's name, or a folder holding your own tokenizer.json."""
    if not choice.strip():
        raise UserError("--tokenizer must not be empty; give char, gpt2, or a folder made by `gptrain tokenizer "
                        "train`")
    if choice == "char":
        return char_tokenizer(charset or set(), documents)
    if choice in known_tokenizers() and choice not in (OWN_BPE, HF):
        return BPETokenizer(choice)
    if Path(choice).exists():
        return read_own_tokenizer(Path(choice))
    raise UserError(f"--tokenizer {choice!r} is neither a tokenizer name (char, gpt2, or a tiktoken encoding) nor a "
                    "folder holding tokenizer.json; train one with gptrain tokenizer train")


def char_tokenizer(charset: set[str], documents: int) -> CharTokenizer:
    if documents < 2:
        return CharTokenizer(sorted(charset))
    if CHAR_END_OF_TEXT in charset:
        raise UserError(f"the text holds {CHAR_END_OF_TEXT!r} (U+2403), the character that separates documents in a "
                        "character-level dataset; remove it, or use a BPE tokenizer")
    itos = sorted(charset | {CHAR_END_OF_TEXT})
    return CharTokenizer(itos, itos.index(CHAR_END_OF_TEXT))


def tokenizer_from_meta(meta: dict, where: str = "meta.json"):
    """The tokenizer a dataset's meta.json (or a checkpoint's copy of it) records."""
    if adds_chat_tokens(meta):  # a chat dataset or model of gptrain's template: the base plus its chat tokens
        return ChatTokenizer(tokenizer_from_meta(base_meta(meta), where))
    if meta["tokenizer"] == OWN_BPE:
        return own_tokenizer_from_meta(meta, where)
    if meta["tokenizer"] == HF:  # the model's own chat template, if it has one, adds no tokens
        return hf_tokenizer_from_meta(meta, where)
    return load_tokenizer(meta["tokenizer"], meta.get("itos"), meta.get("eot_token"))


def meta_fields(tokenizer) -> dict:
    """The fields of meta.json, beside "tokenizer" (its name) and "vocab_size", that tokenizer_from_meta rebuilds
    `tokenizer` from. Every writer of a meta.json (prepare.py, the chat preparation) records these."""
    if isinstance(tokenizer, CharTokenizer):
        return {"itos": tokenizer.itos, "stoi": tokenizer.stoi, "eot_token": tokenizer.eot_token}
    if isinstance(tokenizer, OwnBPETokenizer):
        return {"eot_token": tokenizer.eot_token, "tokenizer_sha256": tokenizer.sha256,
                "tokenizer_json": tokenizer.json}
    if isinstance(tokenizer, HFTokenizer):
        return hf_fields(tokenizer)
    return {"eot_token": tokenizer.eot_token}


def validate_meta(meta: dict, path) -> None:
    """A dataset's meta.json (also carried by every checkpoint): the fields every reader relies on."""
    for key, kind in (("vocab_size", int), ("dtype", str), ("tokenizer", str)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise UserError(f"{path} lacks a valid {key!r}; prepare the dataset again")
    if meta["tokenizer"] not in known_tokenizers():
        raise UserError(f"{path}: unknown tokenizer {meta['tokenizer']!r}; prepare the dataset again")
    if meta["dtype"] not in TOKEN_DTYPES:
        raise UserError(f"{path}: dtype must be one of {', '.join(TOKEN_DTYPES)}, got {meta['dtype']!r}")
    if meta["vocab_size"] < 1 or meta["vocab_size"] - 1 > np.iinfo(meta["dtype"]).max:
        raise UserError(f"{path}: vocab_size {meta['vocab_size']} does not fit dtype {meta['dtype']}")
    if "chat" in meta:
        check_chat_block(meta, path)
    if "preference" in meta:
        check_preference_fields(meta, path)
    if meta["tokenizer"] == "char":
        itos = meta.get("itos")
        if (not isinstance(itos, list) or len(itos) != base_vocab_size(meta)
                or not all(isinstance(ch, str) and len(ch) == 1 and not "\ud800" <= ch <= "\udfff" for ch in itos)
                or len(set(itos)) != len(itos)):
            raise UserError(f"{path}: a char dataset needs 'itos', one distinct character per id; prepare it again")
        eot = meta.get("eot_token")
        if eot is not None and not (isinstance(eot, int) and 0 <= eot < len(itos) and itos[eot] == CHAR_END_OF_TEXT):
            raise UserError(f"{path}: a char dataset's eot_token must be the id of {CHAR_END_OF_TEXT!r}; prepare it "
                            "again")
    elif meta.get("eot_token") is not None and not (
            isinstance(meta["eot_token"], int) and 0 <= meta["eot_token"] < meta["vocab_size"]):
        raise UserError(f"{path}: eot_token must be a token id below vocab_size; prepare the dataset again")
    if meta["tokenizer"] == OWN_BPE:
        validate_own_tokenizer(meta, path)
    if meta["tokenizer"] == HF:
        validate_hf_tokenizer(meta, path)


def validate_own_tokenizer(meta: dict, path) -> None:
    """Your own BPE travels as text with its digest: a change to either (a damaged file) is caught here, before
    any id is read as the wrong text. Parsing the tokenizer is left to whoever needs it (training does not)."""
    text, digest = meta.get("tokenizer_json"), meta.get("tokenizer_sha256")
    if not isinstance(text, str) or not isinstance(digest, str) or not isinstance(meta.get("eot_token"), int):
        raise UserError(f"{path}: a dataset with your own tokenizer ({OWN_BPE}) needs tokenizer_json, "
                        "tokenizer_sha256 and eot_token; prepare the dataset again")
    if sha256_text(text) != digest:
        raise UserError(f"{path}: tokenizer_json does not match tokenizer_sha256 (the file is damaged); prepare the "
                        "dataset again, or use an intact copy of the checkpoint")
