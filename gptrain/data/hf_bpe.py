"""Your own byte-level BPE, run by Hugging Face `tokenizers` and carried whole in a dataset's meta.json.

The pipeline (what gptrain tokenizer train builds and what a tokenizer.json must hold to be used here):
no normalizer, so text comes back byte for byte; a split on GPT-2's or GPT-4's pre-tokenisation regex; the
byte-level map, which gives each of the 256 bytes a symbol of its own, so no text is ever unknown; BPE merges;
the byte-level decoder. <|endoftext|> is a special token, which the trainer never splits or merges.

meta.json records the tokenizer as "tokenizer": "hf-bpe", "tokenizer_json" (the file's text) and
"tokenizer_sha256" (of that text's UTF-8 bytes): every checkpoint copies meta.json, so a model can be sampled,
scored and exported on a machine that has neither the dataset nor the tokenizer folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np

from gptrain.data.readers import safe_cut
from gptrain.errors import UserError, one_line
from gptrain.runtime.files import kind_of, read_text

OWN_BPE = "hf-bpe"
ENDOFTEXT = "<|endoftext|>"
INSTALL_HINT = "pip install 'gptrain[tokenizer]'"
SEGMENT_CHARS = 1 << 16  # a long text is encoded as a batch of segments about this long

# The classic spellings of the two patterns (Oniguruma, the regex engine of `tokenizers`, reads them as the
# `regex` module does). gpt4 is cl100k_base's: digits in groups of 1-3, case-insensitive contractions, a letter
# run may take one leading punctuation mark, newlines kept apart from other whitespace.
PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
            r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


def import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError(f"your own BPE tokenizer needs Hugging Face tokenizers: {INSTALL_HINT}") from None
    return tokenizers


def untrained_bpe(pattern: str):
    """An empty byte-level BPE pipeline that splits text on PATTERNS[pattern] before the byte map."""
    tk = import_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(PATTERNS[pattern]), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # the regex ran just before
    ])
    tokenizer.decoder = tk.decoders.ByteLevel()
    return tokenizer


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def byte_of_symbol() -> dict[str, int]:
    """GPT-2's byte-level map, inverted: printable bytes stand for themselves, the other 68 are shifted to the
    code points from 256 on, so every token string spells its bytes in visible characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbols = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return {symbol: b for b, symbol in symbols.items()}


def check_pipeline(spec: dict, where: str) -> None:
    """Refuse a tokenizer.json that is not a byte-level BPE with <|endoftext|>: other kinds could meet text they
    cannot encode, or give back other text than they were given."""
    fix = "train one with gptrain tokenizer train"
    steps = spec.get("pre_tokenizer") or {}
    steps = steps.get("pretokenizers", [steps]) if isinstance(steps, dict) else []
    if (spec.get("model") or {}).get("type") != "BPE":
        raise UserError(f"{where} is not a BPE tokenizer; {fix}")
    if not any(isinstance(s, dict) and s.get("type") == "ByteLevel" for s in steps) \
            or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{where} is not byte-level (a ByteLevel pre-tokenizer and decoder), so some text would "
                        f"have no tokens; {fix}")
    if spec.get("normalizer") is not None:
        raise UserError(f"{where} has a normalizer, so decoded text would differ from the original; {fix}")
    if not any(isinstance(t, dict) and t.get("content") == ENDOFTEXT for t in spec.get("added_tokens") or []):
        raise UserError(f"{where} has no {ENDOFTEXT} token to separate documents; {fix}")


class TokenizersRun:
    """What the tokenizers run by Hugging Face `tokenizers` share (your own BPE here, a model's tokenizer.json in
    model_tokenizer.py): decoding, ids as an array, and a token's bytes through the byte-level map. A subclass
    sets self.tokenizer (a tokenizers.Tokenizer), self.added (id -> an added token's text) and encode()."""

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def encode_array(self, text: str, dtype: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=dtype)

    @cached_property
    def _byte_of(self) -> dict[str, int]:
        return byte_of_symbol()

    def symbol_bytes(self, token: int) -> bytes:
        """An added token's text, else the token's byte-level symbols mapped back to bytes; nothing for an id
        inside a gap of the vocabulary, which the tokenizer never makes."""
        if token in self.added:
            return self.added[token].encode("utf-8")
        piece = self.tokenizer.id_to_token(token)
        return b"" if piece is None else bytes(self._byte_of[symbol] for symbol in piece)


class OwnBPETokenizer(TokenizersRun):
    """The same interface as data.tokenizer's CharTokenizer and BPETokenizer, for a tokenizer.json's text."""

    name = OWN_BPE

    def __init__(self, tokenizer_json: str, where: str):
        try:
            spec = json.loads(tokenizer_json)
        except (ValueError, RecursionError):
            raise UserError(f"{where} is not valid JSON; train the tokenizer again") from None
        if not isinstance(spec, dict):
            raise UserError(f"{where} must hold a JSON object; train the tokenizer again")
        check_pipeline(spec, where)
        try:
            self.tokenizer = import_tokenizers().Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # the library raises a plain Exception for a malformed file
            raise UserError(f"{where} cannot be loaded by tokenizers ({one_line(exc)}); train it again") from None
        self.tokenizer.encode_special_tokens = True  # text is data: "<|endoftext|>" in it is not special
        self.json = tokenizer_json
        self.sha256 = sha256_text(tokenizer_json)
        self.eot_token = self.tokenizer.token_to_id(ENDOFTEXT)
        self.added = {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items()}
        if max(self.tokenizer.get_vocab(with_added_tokens=True).values()) != self.vocab_size - 1:
            raise UserError(f"{where}: its token ids are not 0..{self.vocab_size - 1} without gaps; train it again")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The library encodes a batch of segments without offsets and on every core: measured 1.7 times as
        fast per core as one long string, and the same ids, as the segments end where pre-tokens end."""
        encodings = self.tokenizer.encode_batch_fast(list(segments(text)), add_special_tokens=False)
        return [token for encoding in encodings for token in encoding.ids]

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes (it may hold part of a UTF-8 character): its symbols mapped back to bytes."""
        return self.symbol_bytes(token)


def segments(text: str) -> Iterator[str]:
    """The text in stretches of at most about SEGMENT_CHARS, each cut after a lone newline between non-space
    characters, which both patterns make a pre-token of its own (readers.safe_cut); a stretch without one
    stays whole."""
    start = 0
    while len(text) - start > SEGMENT_CHARS:
        cut = safe_cut(text[start: start + SEGMENT_CHARS])
        if not cut:
            break
        yield text[start: start + cut]
        start += cut
    yield text[start:]


def read_own_tokenizer(path: Path) -> OwnBPETokenizer:
    """The tokenizer in a folder written by gptrain tokenizer train (or the tokenizer.json file itself)."""
    path, fix = Path(path), "give --tokenizer a folder made by gptrain tokenizer train"
    file = path / "tokenizer.json" if kind_of(path) == "dir" else path
    if file.suffix != ".json":
        raise UserError(f"--tokenizer {path} is neither a folder holding tokenizer.json nor a .json file; {fix}")
    text = read_text(file, "tokenizer file", fix)
    return OwnBPETokenizer(text, str(file))


def own_tokenizer_from_meta(meta: dict, where: str = "meta.json") -> OwnBPETokenizer:
    """The tokenizer a dataset or checkpoint carries, checked against the size and the digest recorded with it."""
    text = meta.get("tokenizer_json")
    if not isinstance(text, str) or meta.get("tokenizer_sha256") != sha256_text(text):
        raise UserError(f"{where}: tokenizer_json does not match tokenizer_sha256 (the file is damaged); prepare the "
                        "dataset again, or use an intact copy of the checkpoint")
    tokenizer = OwnBPETokenizer(text, f"{where} (its tokenizer_json)")
    if (tokenizer.vocab_size, tokenizer.eot_token) != (meta.get("vocab_size"), meta.get("eot_token")):
        raise UserError(f"{where}: vocab_size {meta.get('vocab_size')} and eot_token {meta.get('eot_token')} are not "
                        f"the tokenizer's ({tokenizer.vocab_size}, {tokenizer.eot_token}); prepare the dataset again")
    return tokenizer
