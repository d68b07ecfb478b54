"""Tokenizers named by a dataset's meta.json: character level (maps stored in meta.json) or tiktoken BPE."""

from __future__ import annotations

from gptrain.errors import UserError


class CharTokenizer:
    def __init__(self, itos: list[str]):
        self.itos = itos
        self.stoi = {ch: i for i, ch in enumerate(itos)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

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


class TiktokenTokenizer:
    def __init__(self, name: str):
        import tiktoken

        try:
            self.encoding = tiktoken.get_encoding(name)
        except Exception as exc:  # tiktoken raises ValueError for unknown names, network errors when offline
            raise UserError(f"cannot load the tiktoken encoding {name!r}: {exc}") from None

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


def tokenizer_from_meta(meta: dict):
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["itos"])
    return TiktokenTokenizer(meta["tokenizer"])
