"""export-hf's tokenizer files, loaded by transformers' AutoTokenizer and compared with the tokenizers gptrain
trained and sampled with (tiktoken for GPT-2's BPE, Hugging Face tokenizers for your own BPE, the character map)."""

import json
import random
import sys

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from gptrain.data.bpe_training import train_bpe  # noqa: E402
from gptrain.data.chat import chat_block, render, render_prompt  # noqa: E402
from gptrain.data.tokenizer import (  # noqa: E402
    CHAR_END_OF_TEXT,
    CharTokenizer,
    gpt2_encoding,
    meta_fields,
    tokenizer_from_meta,
)
from gptrain.errors import UserError  # noqa: E402
from gptrain.hf.gpt2 import GPT2_TOKENIZER_META  # noqa: E402
from gptrain.hf.tokenizer import generation_end_id, tokenizer_files  # noqa: E402

# Scripts, marks and spacing that byte-level BPE and its pre-tokenisation regex must treat exactly as tiktoken does.
VARIED = "\n".join([
    "It's a test: we'll see, THEY'RE here; I'd've gone. 'Quoted' \"double\" (brackets) [x] {y} <z>",
    "Numbers 0 12 345 6789 3.14159 1,000,000 -42 +7 1e-5 ²³ ١٢٣ ४५६ Ⅻ",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\r\nwindows lines\rold mac\u2028line separator\u00a0nbsp\u3000ideographic space",
    "Ünïcödé façade naïve Ångström Œuvre straße ŁÓDŹ e\u0301 (combining acute) a\u0308",
    "Ελληνικά κείμενα, русский текст, українська, български",
    "עברית מימין לשמאל, العربية مع التشكيل: مَرْحَبًا",
    "हिन्दी देवनागरी, বাংলা, தமிழ், ไทยภาษา, ລາວ, ქართული, Հայերեն",
    "日本語のテキスト、漢字とかな。中文文本，简体与繁體。한국어 텍스트입니다.",
    "Emoji 🤖🎉 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽 keycap 1️⃣ variation ☺︎ ☺️",
    "Symbols ∀x∈ℝ: x²≥0 → ∑ ∫ ≈ ≠ ∞ © ® ™ € £ ¥ § ¶ • … — – ‘’ “” «» ¿¡",
    "Code: def f(x):\n    return x ** 2  # comment\n\n\n\tif a != b: {'k': [1, 2]}",
    "    \n  \n\n   ",
])


def random_unicode(seed: int, length: int) -> str:
    """Code points from every plane in use (no surrogates), in runs like words with spaces between."""
    rng = random.Random(seed)
    planes = [(0x20, 0x7F), (0xA0, 0x2FFF), (0x3000, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x1FAFF)]
    chars = []
    for _ in range(length):
        low, high = rng.choice(planes)
        chars.append(" " if rng.random() < 0.15 else chr(rng.randint(low, high)))
    return "".join(chars)


def auto_tokenizer(tmp_path, meta, block_size=64):
    for name, content in tokenizer_files(meta, block_size, "test checkpoint").items():
        (tmp_path / name).write_bytes(content)
    return transformers.AutoTokenizer.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    return auto_tokenizer(tmp_path_factory.mktemp("gpt2_tokenizer"), GPT2_TOKENIZER_META, block_size=1024)


@pytest.mark.parametrize("name", ["varied", "shakespeare", "random"])
def test_gpt2_files_give_tiktokens_ids_and_text(gpt2_export, shakespeare_text, name):
    text = {"varied": VARIED, "shakespeare": shakespeare_text[:100_000], "random": random_unicode(0, 20_000)}[name]
    ids = gpt2_export(text)["input_ids"]
    assert ids == gpt2_encoding().encode_ordinary(text)
    assert gpt2_export.decode(ids) == text


def test_gpt2_files_treat_endoftext_as_the_special_token(gpt2_export):
    text = "one document<|endoftext|>the next <|endoftext|>\n<|endoftext|>"
    assert gpt2_export(text)["input_ids"] == gpt2_encoding().encode(text, allowed_special="all")
    assert gpt2_export.eos_token == gpt2_export.bos_token == "<|endoftext|>"
    assert gpt2_export.eos_token_id == 50256 and len(gpt2_export) == 50257
    # As data (what gptrain's encode does), the marker is plain text:
    as_text = gpt2_export(text, split_special_tokens=True)["input_ids"]
    assert as_text == gpt2_encoding().encode_ordinary(text)


def test_character_files_give_gptrains_ids(tmp_path, char_dataset):
    meta = json.loads((char_dataset / "meta.json").read_text())
    ours = tokenizer_from_meta(meta)
    exported = auto_tokenizer(tmp_path, meta)
    text = "".join(ours.itos) + "\n\nFirst Citizen:\nBefore we proceed any further, hear me speak.  \n"
    assert exported(text)["input_ids"] == ours.encode(text)
    assert exported.decode(ours.encode(text)) == text
    assert exported.eos_token is None
    with pytest.raises(Exception, match="UNK"):  # a character the model never saw: an error, as in gptrain
        exported("é")


def test_character_files_for_any_script(tmp_path):
    itos = sorted(set(VARIED))
    meta = {"tokenizer": "char", "vocab_size": len(itos), "dtype": "uint16", "itos": itos,
            "stoi": {ch: i for i, ch in enumerate(itos)}}
    exported = auto_tokenizer(tmp_path, meta)
    assert exported(VARIED)["input_ids"] == CharTokenizer(itos).encode(VARIED)
    assert exported.decode(exported(VARIED)["input_ids"]) == VARIED


def test_a_character_model_of_several_documents_ends_texts_with_its_own_end_character(tmp_path):
    """Its eos is the character between documents (a token of the vocabulary), not <|endoftext|>, which
    transformers would add as an id past the model's vocabulary."""
    itos = sorted(set("abc \n" + CHAR_END_OF_TEXT))
    eot = itos.index(CHAR_END_OF_TEXT)
    meta = {"tokenizer": "char", "vocab_size": len(itos), "dtype": "uint8", "itos": itos,
            "stoi": {ch: i for i, ch in enumerate(itos)}, "eot_token": eot}
    exported = auto_tokenizer(tmp_path, meta)
    assert len(exported) == len(itos) and (exported.eos_token_id, exported.bos_token_id) == (eot, eot)
    assert exported("ab" + CHAR_END_OF_TEXT)["input_ids"] == CharTokenizer(itos, eot).encode("ab" + CHAR_END_OF_TEXT)


def own_bpe_meta(text: str) -> dict:
    """A dataset's meta.json for your own BPE, trained on `text` as scripts/train_tokenizer.py trains one."""
    tokenizer = train_bpe([text], vocab_size=400)
    return {"tokenizer": "hf-bpe", "vocab_size": tokenizer.vocab_size, "dtype": "uint16", **meta_fields(tokenizer)}


def test_own_bpe_files_are_the_recorded_tokenizer(tmp_path, shakespeare_text):
    meta = own_bpe_meta(shakespeare_text[:20_000] + VARIED)
    exported = auto_tokenizer(tmp_path, meta)
    assert (tmp_path / "tokenizer.json").read_text(encoding="utf-8") == meta["tokenizer_json"]
    ours = tokenizer_from_meta(meta)
    for text in (VARIED, shakespeare_text[20_000:40_000], random_unicode(1, 5_000)):
        assert exported(text)["input_ids"] == ours.encode(text)
        assert exported.decode(ours.encode(text)) == text
    assert exported.eos_token == "<|endoftext|>" and exported.eos_token_id == meta["eot_token"]


def test_tokenizers_that_cannot_be_written_are_refused(shakespeare_text):
    with pytest.raises(UserError, match="records no tokenizer.*--no_tokenizer"):
        tokenizer_files(None, 64, "ckpt.pt")
    cl100k = {"tokenizer": "cl100k_base", "vocab_size": 100277, "dtype": "uint32"}
    with pytest.raises(UserError, match="tiktoken's cl100k_base.*--no_tokenizer"):
        tokenizer_files(cl100k, 64, "ckpt.pt")
    damaged = {**own_bpe_meta(shakespeare_text[:5_000]), "tokenizer_sha256": "0" * 64}
    with pytest.raises(UserError, match="does not match tokenizer_sha256"):
        tokenizer_files(damaged, 64, "ckpt.pt")


@pytest.mark.parametrize("base", ["char", "gpt2", "own BPE"])
def test_chat_models_get_their_tokens_and_template(tmp_path, char_dataset, shakespeare_text, base):
    meta = {"char": lambda: json.loads((char_dataset / "meta.json").read_text()), "gpt2": lambda: GPT2_TOKENIZER_META,
            "own BPE": lambda: own_bpe_meta(shakespeare_text[:20_000])}[base]()
    chat_meta = {**meta, "vocab_size": meta["vocab_size"] + 4, "chat": chat_block(meta["vocab_size"])}
    ours = tokenizer_from_meta(chat_meta)
    exported = auto_tokenizer(tmp_path, chat_meta)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
                {"role": "assistant", "content": "A friend, my lord."}, {"role": "user", "content": "Speak!"}]
    prompt = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt == render_prompt(ours, messages)
    conversation = render(ours, messages[:3])[0]
    assert exported.decode(conversation) == ours.decode(conversation)
    assert exported.eos_token == "<|end|>" and exported.eos_token_id == ours.end_id == generation_end_id(chat_meta)


def test_without_tokenizers_installed_the_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what `import tokenizers` fails on
    with pytest.raises(UserError, match=r"pip install 'gptrain\[hf\]'"):
        tokenizer_files(GPT2_TOKENIZER_META, 64, "ckpt.pt")
