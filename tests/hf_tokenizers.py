"""Hugging Face model folders' tokenizer files, built here in the shape of the families gptrain fine-tunes: a small
byte-level BPE trained on a few sentences with each family's pre-tokenisation, normaliser and special tokens, saved
by transformers' save_pretrained with the family's real chat template (TRL ships the published templates as files)
and the tokenizer class and generation_config.json the published folders have."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

# The families' pre-tokenisation patterns, as their tokenizer.json files spell them: digits one at a time (Qwen) or
# in groups of up to three (Llama 3).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_PATTERN = QWEN_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
TEXT = [
    "Hello there, how are you? I am fine, thank you. What is two plus two? Four, of course.",
    "You are a helpful assistant. Answer briefly and kindly.",
    "The king is dead. Long live the king! Who art thou? A poor player, my lord.",
    "Ünïcödé façade naïve, 日本語のテキスト, русский текст, emoji 🤖🎉 and 3.14159.",
    "First\n\nSecond\n\nThird\n\n" * 20,  # "\n\n" becomes a token, as in the published vocabularies
]
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
          "<|eot_id|>"]


@dataclass
class Family:
    pattern: str
    special: list[str]
    tokenizer_class: str
    named: dict[str, str | None]  # bos_token, eos_token, pad_token as tokenizer_config.json has them
    generation_eos: list[str]  # generation_config.json's eos_token_id
    template: str  # TRL's file name
    added: list[str] = field(default_factory=list)  # added tokens that are not special (Qwen3's <think>)
    nfc: bool = False
    bos_post_processor: bool = False  # Llama 3's tokenizer.json adds <|begin_of_text|> to tokenizer(text)


FAMILIES = {
    "qwen2_5": Family(QWEN_PATTERN, CHATML, "Qwen2Tokenizer",
                      {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                      ["<|im_end|>", "<|endoftext|>"], "qwen2_5", nfc=True),
    "qwen3": Family(QWEN_PATTERN, CHATML, "Qwen2Tokenizer",
                    {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                    ["<|im_end|>", "<|endoftext|>"], "qwen3", added=["<think>", "</think>"], nfc=True),
    "llama3_2": Family(LLAMA3_PATTERN, LLAMA3, "PreTrainedTokenizerFast",
                       {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                       ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "llama3_2", bos_post_processor=True),
    "llama3": Family(LLAMA3_PATTERN, LLAMA3, "PreTrainedTokenizerFast",
                     {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                     ["<|end_of_text|>", "<|eot_id|>"], "llama3", bos_post_processor=True),
}


def trl_template(name: str) -> str:
    return (resources.files("trl") / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def train_tokenizer(family: Family):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    if family.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(family.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(TEXT * 5, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.added])
    if family.bos_post_processor:
        bos = family.named["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def build_tokenizer_folder(folder: Path, name: str, template: str | None = None) -> Path:
    """FOLDER with tokenizer.json, tokenizer_config.json, chat_template.jinja (where save_pretrained writes it;
    the Llama families keep it in tokenizer_config.json, as their published folders do) and
    generation_config.json. `template` replaces the family's chat template."""
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[name]
    tokenizer = train_tokenizer(family)
    template = trl_template(family.template) if template is None else template
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=template, **family.named).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = family.tokenizer_class
    if name.startswith("llama"):
        config["chat_template"] = (folder / "chat_template.jinja").read_text()
        (folder / "chat_template.jinja").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    ids = [tokenizer.token_to_id(t) for t in family.generation_eos]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids if len(ids) > 1 else ids[0]}))
    return folder


def auto_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def write_character_tokenizer(folder: Path, vocab_size: int) -> Path:
    """tokenizer.json of `vocab_size` single-character tokens beside a test's random Hugging Face model, which
    import-hf refuses without a tokenizer."""
    from gptrain.hf.tokenizer import character_tokenizer

    characters = [chr(0x4E00 + i) for i in range(vocab_size)]  # CJK ideographs: one character, one token
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(character_tokenizer(characters).to_str(), encoding="utf-8")
    return folder


def save_with_tokenizer(model, folder: Path) -> Path:
    """A transformers model saved as a Hugging Face folder with a tokenizer of its vocabulary's size (and without
    the generation_config.json save_pretrained writes, whose end token is GPT2Config's default 50256, an id this
    tokenizer does not have)."""
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    return write_character_tokenizer(folder, model.config.vocab_size)
