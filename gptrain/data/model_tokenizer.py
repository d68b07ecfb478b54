"""A Hugging Face model's own tokenizer (Llama 3, Qwen2.5, Qwen3, SmolLM2, ...): its tokenizer.json, run by
Hugging Face `tokenizers` as transformers runs it, and carried whole in a dataset's or checkpoint's meta, with
what its other files say (data/hf_tokenizer.py reads a model folder into this meta).

meta.json records it as "tokenizer": "hf" and
- "tokenizer_json" (the file's text, byte for byte) and "tokenizer_sha256" (of its UTF-8 bytes), as your own BPE;
- "special_tokens": the named special tokens ({"bos_token": "<|begin_of_text|>", "eos_token": ..., ...}), the
  variables transformers gives a chat template;
- "eot_token": the eos token's id (what separates documents; None without an eos);
- "end_token_ids": every id that ends a generated text: generation_config.json's eos_token_id and the eos;
- "chat_template": the model's Jinja chat template, or None (data/jinja_chat.py renders it).
"vocab_size" is one more than the largest id (len(tokenizer) in transformers, added tokens included), or the model's
embedding rows when it has more (Qwen2.5's 151,936 rows for 151,665 ids): the ids past the tokenizer's are never
made and decode to nothing, and dataset, tokenizer and model then agree on one vocabulary.

Text is data, as everywhere in gptrain: encode() reads "<|im_end|>" typed in a text as characters. Only a chat
template's rendering is read with its special tokens (encode_markup), as apply_chat_template reads it.
"""

from __future__ import annotations

import json

from gptrain.data.hf_bpe import TokenizersRun, import_tokenizers, sha256_text
from gptrain.errors import UserError, one_line

HF = "hf"
# The named special tokens transformers passes to a chat template (PreTrainedTokenizerBase's
# SPECIAL_TOKENS_ATTRIBUTES).
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REFETCH = "copy the model's tokenizer files again"


class HFTokenizer(TokenizersRun):
    """The interface of data.tokenizer's tokenizers, for a Hugging Face model's tokenizer.json."""

    name = HF

    def __init__(self, tokenizer_json: str, special_tokens: dict[str, str], chat_template: str | None,
                 end_token_ids: list[int], where: str, model_rows: int = 0):
        self.json = tokenizer_json
        self.sha256 = sha256_text(tokenizer_json)
        self.tokenizer = parse(tokenizer_json, where)
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        ids = self.tokenizer.get_vocab(with_added_tokens=True).values()
        if not ids:
            raise UserError(f"{where} has an empty vocabulary; {REFETCH}")
        self.vocab_size = max(max(ids) + 1, model_rows)
        for name, spelling in special_tokens.items():
            if self.tokenizer.token_to_id(spelling) is None:
                raise UserError(f"{where}: the {name} {spelling!r} is not one of its tokens; {REFETCH}")
        eos = special_tokens.get("eos_token")
        self.eot_token = None if eos is None else self.tokenizer.token_to_id(eos)
        self.end_token_ids = sorted({*end_token_ids, self.eot_token} - {None})
        if any(not 0 <= token < self.vocab_size for token in self.end_token_ids):
            raise UserError(f"{where}: the end token ids {self.end_token_ids} (generation_config.json's eos_token_id "
                            f"and the eos) must be below the vocabulary's {self.vocab_size}; {REFETCH}")
        self.added = {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items()}
        # The spellings a message may not hold: the template's rendering would read them as the tokens.
        self.special_spellings = sorted({t.content for t in self.tokenizer.get_added_tokens_decoder().values()
                                         if t.special}, key=len, reverse=True)
        decoder = json.loads(tokenizer_json).get("decoder") or {}
        self.byte_level = "ByteLevel" in {d.get("type") for d in [decoder, *decoder.get("decoders", [])]
                                          if isinstance(d, dict)}

    def encode(self, text: str) -> list[int]:
        """Text as data: special tokens' spellings are characters, and nothing is added (no BOS)."""
        return self._encode(text, split_special_tokens=True)

    def encode_markup(self, text: str) -> list[int]:
        """A chat template's rendering: its special tokens' spellings are the tokens, as apply_chat_template reads
        it (which adds nothing either: the template writes a BOS if the model wants one)."""
        return self._encode(text, split_special_tokens=False)

    def _encode(self, text: str, split_special_tokens: bool) -> list[int]:
        self.tokenizer.encode_special_tokens = split_special_tokens
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes, for streaming: with the byte-level map a token may hold part of a UTF-8 character, whose
        bytes the stream holds back until it is whole. Other tokenizers decode a token at a time."""
        if self.byte_level or token in self.added:
            return self.symbol_bytes(token)
        return self.decode([token]).encode("utf-8")  # (an id inside a gap of the vocabulary decodes to nothing)


def parse(tokenizer_json: str, where: str):
    try:
        json.loads(tokenizer_json)
    except (ValueError, RecursionError):
        raise UserError(f"{where} is not valid JSON; {REFETCH}") from None
    try:
        return import_tokenizers().Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # the library raises a plain Exception for a malformed file
        raise UserError(f"{where} cannot be loaded by tokenizers ({one_line(exc)}); {REFETCH}") from None


def hf_fields(tokenizer: HFTokenizer) -> dict:
    """The meta fields, beside "tokenizer", "vocab_size" and "dtype", that hf_tokenizer_from_meta rebuilds it from;
    the long tokenizer_json last, below the fields a reader looks for."""
    return {"eot_token": tokenizer.eot_token, "special_tokens": tokenizer.special_tokens,
            "end_token_ids": tokenizer.end_token_ids, "chat_template": tokenizer.chat_template,
            "tokenizer_sha256": tokenizer.sha256, "tokenizer_json": tokenizer.json}


def validate_hf_tokenizer(meta: dict, path) -> None:
    """The fields of an "hf" meta, their types and the tokenizer_json's digest: a damaged file is caught here, before
    any id is read as the wrong text. Parsing the tokenizer is left to whoever needs it (training does not)."""
    fix = "prepare the dataset again, or use an intact copy of the checkpoint"
    text, special, ends = meta.get("tokenizer_json"), meta.get("special_tokens"), meta.get("end_token_ids")
    if (not isinstance(text, str) or not isinstance(meta.get("tokenizer_sha256"), str)
            or not isinstance(special, dict) or not all(k in NAMED_TOKENS and isinstance(v, str)
                                                        for k, v in special.items())
            or not isinstance(ends, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ends)
            or not isinstance(meta.get("chat_template"), (str, type(None)))):
        raise UserError(f"{path}: a Hugging Face tokenizer ({HF}) needs tokenizer_json, tokenizer_sha256, "
                        f"special_tokens, end_token_ids and chat_template; {fix}")
    if sha256_text(text) != meta["tokenizer_sha256"]:
        raise UserError(f"{path}: tokenizer_json does not match tokenizer_sha256 (the file is damaged); {fix}")


def hf_tokenizer_from_meta(meta: dict, where: str = "meta.json") -> HFTokenizer:
    """The tokenizer a dataset or checkpoint carries, checked against the digest and the ids recorded with it."""
    validate_hf_tokenizer(meta, where)
    rows = meta.get("vocab_size") if isinstance(meta.get("vocab_size"), int) else 0
    tokenizer = HFTokenizer(meta["tokenizer_json"], meta["special_tokens"], meta["chat_template"],
                            meta["end_token_ids"], f"{where} (its tokenizer_json)", rows)
    recorded = (meta.get("vocab_size"), meta.get("eot_token"), meta["end_token_ids"])
    if recorded != (tokenizer.vocab_size, tokenizer.eot_token, tokenizer.end_token_ids):
        raise UserError(f"{where}: vocab_size, eot_token and end_token_ids {recorded} are not the tokenizer's "
                        f"({tokenizer.vocab_size}, {tokenizer.eot_token}, {tokenizer.end_token_ids}); prepare the "
                        "dataset again")
    return tokenizer
