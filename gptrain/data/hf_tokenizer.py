"""A Hugging Face model folder's tokenizer files -> the tokenizer meta a checkpoint carries (model_tokenizer.py
describes it), so a model comes in with its tokenizer and every command uses it: import-hf, init_from: from:HF_DIR
and `gptrain prepare chat --tokenizer from:HF_DIR` read a folder through tokenizer_meta_of_folder.

The files, as transformers reads them: tokenizer.json (the tokenizer itself, kept byte for byte); the named special
tokens from tokenizer_config.json, else special_tokens_map.json; the chat template from chat_template.jinja (where
transformers 5 writes it), else tokenizer_config.json's chat_template; generation_config.json's eos_token_id (an id
or a list), which with the tokenizer's eos makes the ids that end a generated text.

gptrain's own exports (hf/tokenizer.py) write tokenizer files for characters, GPT-2's BPE and your own BPE, which
have no Hugging Face equivalent to come back as. Their tokenizer_config.json records the checkpoint's tokenizer meta
under "gptrain_tokenizer", with the sha256 of the tokenizer.json written beside it: while that file is unchanged,
the folder reads back as the recorded meta, so import -> export -> import gives back the very tokenizer; a
tokenizer.json changed since is what the folder means now, and reads as a Hugging Face tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from gptrain.data.chat import ChatTokenizer
from gptrain.data.hf_bpe import sha256_text
from gptrain.data.model_tokenizer import HF, NAMED_TOKENS, HFTokenizer, hf_fields
from gptrain.data.tokenizer import (
    meta_fields,
    open_tokenizer,
    smallest_token_dtype,
    tokenizer_from_meta,
    validate_meta,
)
from gptrain.errors import UserError
from gptrain.runtime.files import kind_of, read_json_object, read_text
from gptrain.runtime.names import TOKENIZER_TRAINING_FILES

GPTRAIN_TOKENIZER = "gptrain_tokenizer"  # tokenizer_config.json's key for an export's record
FIX = "copy the model's tokenizer files again, or fix the file"


def tokenizer_meta_of_folder(folder: Path) -> dict | None:
    """The tokenizer meta of a Hugging Face model folder, or None when it has no tokenizer.json (the caller decides
    whether a model may come without its tokenizer). A malformed file is a UserError naming it."""
    folder = Path(folder)
    if kind_of(folder / "tokenizer.json") is None:
        return None
    tokenizer_json = read_text(folder / "tokenizer.json", "tokenizer file", FIX)
    config = optional_json(folder / "tokenizer_config.json")
    recorded = recorded_meta(config, tokenizer_json, folder / "tokenizer_config.json")
    if recorded is not None:
        return recorded
    tokenizer = HFTokenizer(tokenizer_json, named_tokens(folder, config), chat_template(folder, config),
                            generation_end_ids(folder / "generation_config.json"), str(folder / "tokenizer.json"),
                            model_rows(folder / "config.json"))
    return hf_meta(tokenizer)


def hf_meta(tokenizer: HFTokenizer) -> dict:
    return {"tokenizer": HF, "vocab_size": tokenizer.vocab_size, "dtype": smallest_token_dtype(tokenizer.vocab_size),
            **hf_fields(tokenizer)}


def model_rows(config_path: Path) -> int:
    """The vocabulary of the model beside the tokenizer (config.json's vocab_size), which may have more rows than
    the tokenizer has ids; 0 when there is no model there."""
    rows = optional_json(config_path).get("vocab_size")
    return rows if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0 else 0


def with_model_rows(meta: dict, rows: int) -> dict:
    """A model's tokenizer meta for a model of `rows` embedding rows, when the tokenizer came from elsewhere
    (import-hf --tokenizer): its vocabulary grows to the model's; other tokenizers are left as they are."""
    if meta["tokenizer"] != HF or meta["vocab_size"] >= rows:
        return meta
    return hf_meta(HFTokenizer(meta["tokenizer_json"], meta["special_tokens"], meta["chat_template"],
                               meta["end_token_ids"], "--tokenizer", rows))


def tokenizer_meta_of_choice(choice: str) -> dict:
    """The tokenizer meta `import-hf --tokenizer CHOICE` names, for a model folder without tokenizer files: a
    tiktoken name (gpt2, ...), a Hugging Face model's folder (read by tokenizer_meta_of_folder), or your own BPE (a
    folder written by gptrain tokenizer train, or its tokenizer.json)."""
    if choice == "char":
        raise UserError("--tokenizer char needs the characters of the text the model was trained on; give gpt2, a "
                        "folder holding a model's tokenizer.json, or your own BPE")
    path = Path(choice)
    if kind_of(path) == "dir" and kind_of(path / TOKENIZER_TRAINING_FILES[1]) is None:
        meta = tokenizer_meta_of_folder(path)
        if meta is None:
            raise UserError(f"--tokenizer {choice} holds no tokenizer.json; give a folder holding a Hugging Face "
                            "model's tokenizer files, a tokenizer name such as gpt2, or your own BPE")
        return meta
    tokenizer = open_tokenizer(choice)
    return {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "dtype": smallest_token_dtype(tokenizer.vocab_size), **meta_fields(tokenizer)}


def optional_json(path: Path) -> dict:
    """A JSON object file the folder may lack (then {})."""
    return read_json_object(path, "tokenizer file", FIX) if kind_of(path) is not None else {}


def named_tokens(folder: Path, config: dict) -> dict[str, str]:
    """{name: spelling} of the named special tokens: tokenizer_config.json's, then special_tokens_map.json's for the
    names it leaves out. A value is a spelling or an AddedToken's mapping ({"content": ...}); null means none."""
    found = {}
    for where, values in ((folder / "tokenizer_config.json", config),
                          (folder / "special_tokens_map.json", optional_json(folder / "special_tokens_map.json"))):
        for name in NAMED_TOKENS:
            if name in found or values.get(name) is None:
                continue
            value = values[name]
            spelling = value.get("content") if isinstance(value, dict) else value
            if not isinstance(spelling, str) or not spelling:
                raise UserError(f"tokenizer file {where}: {name} must be a token's spelling or a mapping with its "
                                f"\"content\", got {value!r}; {FIX}")
            found[name] = spelling
    return found


def chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template: one template, or a list of named ones of
    which transformers uses "default"."""
    if kind_of(folder / "chat_template.jinja") is not None:
        return read_text(folder / "chat_template.jinja", "chat template", FIX)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise UserError(f"tokenizer file {folder / 'tokenizer_config.json'}: chat_template lists templates but "
                            f"none named \"default\", the one a conversation is rendered with; {FIX}")
    if template is not None and not isinstance(template, str):
        raise UserError(f"tokenizer file {folder / 'tokenizer_config.json'}: chat_template must be a Jinja template "
                        f"(text), got {type(template).__name__}; {FIX}")
    return template


def generation_end_ids(path: Path) -> list[int]:
    """generation_config.json's eos_token_id: the ids that end a generated text (none without the file)."""
    value = optional_json(path).get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise UserError(f"generation config {path}: eos_token_id must be a token id or a list of them, got "
                        f"{value!r}; {FIX}")
    return ids


# ----- gptrain's own tokenizers through an export -------------------------------------------------------------


def tokenizer_part(meta: dict) -> dict:
    """A dataset's or checkpoint's meta less the dataset's figures: what rebuilds its tokenizer and chat template."""
    tokenizer = tokenizer_from_meta(meta)
    base = tokenizer.base if isinstance(tokenizer, ChatTokenizer) else tokenizer
    chat = {"chat": meta["chat"]} if "chat" in meta else {}
    return {"tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"], "dtype": meta["dtype"],
            **meta_fields(base), **chat}


def export_record(meta: dict, tokenizer_json: str) -> dict:
    """What an export writes under GPTRAIN_TOKENIZER: the tokenizer part of the checkpoint's meta (its
    tokenizer_json left out where it is the tokenizer.json written beside it) and that file's sha256."""
    part = tokenizer_part(meta)
    if part.get("tokenizer_json") == tokenizer_json:
        del part["tokenizer_json"]
    return {"meta": part, "tokenizer_sha256": sha256_text(tokenizer_json)}


def recorded_meta(config: dict, tokenizer_json: str, path: Path) -> dict | None:
    """The meta an export recorded in tokenizer_config.json (`path`), if the tokenizer.json beside it is still the
    one it wrote; else None."""
    record = config.get(GPTRAIN_TOKENIZER)
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("meta"), dict):
        raise UserError(f"tokenizer file {path}: {GPTRAIN_TOKENIZER} is damaged; export the model again, or delete "
                        f"the {GPTRAIN_TOKENIZER} entry to read the folder as a Hugging Face tokenizer")
    if record.get("tokenizer_sha256") != sha256_text(tokenizer_json):
        return None
    meta = dict(record["meta"])
    if "tokenizer_sha256" in meta and "tokenizer_json" not in meta:  # the file beside it holds the tokenizer_json
        meta["tokenizer_json"] = tokenizer_json
    where = f"{path} (its {GPTRAIN_TOKENIZER})"
    validate_meta(meta, where)
    tokenizer_from_meta(meta, where)  # rebuilds it: the digest, the ids it records
    return meta
