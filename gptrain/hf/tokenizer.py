"""Hugging Face tokenizer files for an export: what AutoTokenizer (and so transformers' pipeline) needs to turn
text into the model's ids and back, from the export folder alone, offline.

Each tokenizer a checkpoint can record becomes a `tokenizers` pipeline that gives gptrain's ids exactly:
- gpt2 / r50k_base: tiktoken's byte-level BPE ranks, converted to vocabulary and merges here (no download);
- hf-bpe (your own BPE): the tokenizer.json the checkpoint carries whole, unchanged;
- hf (a Hugging Face model's own tokenizer): its tokenizer.json unchanged, its named special tokens and its chat
  template, so AutoTokenizer gives the ids and apply_chat_template the rendering the model came with;
- char: a word-level model whose words are the characters, after a pre-tokenizer that isolates every
  character and with a decoder that joins them without spaces; a character outside the vocabulary is an
  error, as it is in gptrain.
A chat model (data/chat.py) adds its four special tokens after the base vocabulary, and the chat template as
Jinja, so apply_chat_template renders a conversation to the ids gptrain trained on.
Other tiktoken encodings are refused: their pre-tokenisation pattern is not part of tiktoken's public API.
tokenizer_config.json also records the checkpoint's own tokenizer meta (data/hf_tokenizer.py's export_record), so an
import of the export gives back the very tokenizer, characters and chat template included.
"""

from __future__ import annotations

import json

from gptrain.data.chat import END, SPECIAL_TOKENS, ChatTokenizer, adds_chat_tokens
from gptrain.data.hf_bpe import OWN_BPE, OwnBPETokenizer, byte_of_symbol
from gptrain.data.hf_tokenizer import GPTRAIN_TOKENIZER, export_record
from gptrain.data.model_tokenizer import HF, HFTokenizer
from gptrain.data.tokenizer import ENDOFTEXT, GPT2_PATTERN, OFFLINE_ENCODINGS, CharTokenizer, tokenizer_from_meta
from gptrain.errors import UserError

INSTALL_HINT = "pip install 'gptrain[hf]'"
MODEL_ONLY_HINT = "pass --no_tokenizer to export the model alone"
# data/chat.py's template: each message is <|role|> content <|end|>; a prompt ends with <|assistant|>.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '" + END
                 + "' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError(f"writing tokenizer files needs Hugging Face tokenizers: {INSTALL_HINT}") from None
    return tokenizers


def generation_end_id(meta: dict | None) -> int | list[int] | None:
    """config.json's eos_token_id, the token or tokens that end a generated text: <|end|> for a model of gptrain's
    chat template, a Hugging Face tokenizer's end_token_ids (an id when there is one), else <|endoftext|>."""
    if meta and adds_chat_tokens(meta):
        return meta["chat"]["first_special_id"] + SPECIAL_TOKENS.index(END)
    ends = (meta or {}).get("end_token_ids")
    if ends:
        return ends[0] if len(ends) == 1 else ends
    return (meta or {}).get("eot_token")


def tokenizer_files(meta: dict | None, block_size: int, where: str) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json (name -> content) for the tokenizer a checkpoint records. The chat
    template goes into tokenizer_config.json, which every transformers version reads (transformers 5 reads
    chat_template.jinja first, so an export replaces one left in its folder)."""
    if not meta:
        raise UserError(f"{where} records no tokenizer (a model imported without its tokenizer files), so there is "
                        f"no tokenizer to write; {MODEL_ONLY_HINT}")
    if meta["tokenizer"] not in ("char", OWN_BPE, HF, *OFFLINE_ENCODINGS):
        raise UserError(f"{where} uses tiktoken's {meta['tokenizer']}, which export-hf cannot write as Hugging Face "
                        f"tokenizer files (it writes gpt2's, your own BPE, a Hugging Face model's and char); "
                        f"{MODEL_ONLY_HINT}")
    tokenizer = tokenizer_from_meta(meta, where)  # checks the recorded tokenizer (a tokenizer.json: its sha256)
    chat = isinstance(tokenizer, ChatTokenizer)
    base = tokenizer.base if chat else tokenizer
    # tokenizer_class PreTrainedTokenizerFast runs tokenizer.json as it is (a model's own class may rebuild parts
    # of it); no clean-up of spaces, which would change decoded text ("a ." -> "a.").
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, **special_tokens_of(base)}
    if isinstance(base, HFTokenizer) and base.chat_template is not None:
        config["chat_template"] = base.chat_template
    if isinstance(base, (OwnBPETokenizer, HFTokenizer)) and not chat:
        tokenizer_json = base.json  # byte for byte as it came
    else:
        pipeline = hf_pipeline(base)
        if chat:
            add_chat_tokens(pipeline, base.vocab_size)
            config.update(eos_token=END, chat_template=CHAT_TEMPLATE)
        tokenizer_json = pipeline.to_str()
    config[GPTRAIN_TOKENIZER] = export_record(meta, tokenizer_json)
    return {"tokenizer.json": tokenizer_json.encode("utf-8"),
            "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}


def special_tokens_of(base) -> dict[str, str]:
    """tokenizer_config.json's bos_token, eos_token, ...: a Hugging Face tokenizer's own; <|endoftext|> for GPT-2's
    BPE and yours; for characters, the character between documents (CHAR_END_OF_TEXT) where there is one, which
    is a token of that vocabulary where <|endoftext|> is not."""
    if isinstance(base, HFTokenizer):
        return dict(base.special_tokens)
    if base.eot_token is None:
        return {}
    end = base.itos[base.eot_token] if isinstance(base, CharTokenizer) else ENDOFTEXT
    return {"bos_token": end, "eos_token": end}


def hf_pipeline(tokenizer):
    """A `tokenizers` Tokenizer that gives gptrain's `tokenizer`'s ids."""
    if isinstance(tokenizer, CharTokenizer):
        return character_tokenizer(tokenizer.itos)
    if isinstance(tokenizer, (OwnBPETokenizer, HFTokenizer)):
        return import_tokenizers().Tokenizer.from_str(tokenizer.json)
    return gpt2_tokenizer(tokenizer.encoding)


def add_chat_tokens(pipeline, first_id: int) -> None:
    tk = import_tokenizers()
    pipeline.add_special_tokens([tk.AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    ids = [pipeline.token_to_id(token) for token in SPECIAL_TOKENS]
    if ids != list(range(first_id, first_id + len(SPECIAL_TOKENS))):  # they must follow the base vocabulary
        raise UserError(f"the chat tokens got the ids {ids} in the Hugging Face tokenizer, not {first_id} and on; "
                        "the checkpoint's tokenizer is damaged")


def character_tokenizer(itos: list[str]):
    """Token i is the character itos[i]. WordLevel over single characters: every character is a word."""
    tk = import_tokenizers()
    # The unknown token is named but not in the vocabulary, so an unknown character raises instead of mapping
    # to some id.
    tokenizer = tk.Tokenizer(tk.models.WordLevel({ch: i for i, ch in enumerate(itos)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")  # each code point
    tokenizer.decoder = tk.decoders.Fuse()  # join the characters as they are (the default joins with spaces)
    return tokenizer


def gpt2_tokenizer(encoding):
    """GPT-2's BPE as a `tokenizers` pipeline with tiktoken's ids: its pre-tokenisation regex, the byte-level
    map, BPE over the converted ranks, <|endoftext|> as a special token."""
    tk = import_tokenizers()
    ranks = {token: encoding.encode_single_token(token) for token in encoding.token_byte_values()}
    symbol = {b: s for s, b in byte_of_symbol().items()}
    spell = lambda token: "".join(symbol[b] for b in token)  # noqa: E731 (bytes -> the vocabulary's string)
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [tuple(map(spell, merged_from(token, rank, ranks)))
              for token, rank in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    # ignore_merges: a pre-token that is itself in the vocabulary is taken whole, as tiktoken does.
    tokenizer = tk.Tokenizer(tk.models.BPE(vocab, merges, ignore_merges=True))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(GPT2_PATTERN), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # the regex ran just before
    ])
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.add_special_tokens([tk.AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return tokenizer


def merged_from(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """The two tokens `token` was merged from. tiktoken keeps only ranks; BPE over the token's bytes with the
    merges ranked below it stops at exactly the pair that tiktoken's own encoding merges last, so each token
    gets the one merge tiktoken would apply, in rank order."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(left + right), i) for i, (left, right) in enumerate(zip(parts, parts[1:]))]
        _, i = min((r, i) for r, i in pairs if r is not None and r < rank)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts
