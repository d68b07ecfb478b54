"""A Hugging Face model folder's tokenizer files as the meta a checkpoint carries (data/hf_tokenizer.py), checked
against transformers' AutoTokenizer on the same folder; streaming decode; gptrain's own exports read back as the
tokenizer they were written from; and every malformed file refused with one `error:` line."""

import json
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hf_tokenizers import FAMILIES, auto_tokenizer, build_tokenizer_folder  # noqa: E402

from gptrain.cli import main, run_guarded  # noqa: E402
from gptrain.data.bpe_training import train_bpe  # noqa: E402
from gptrain.data.chat import chat_block, jinja_chat_block  # noqa: E402
from gptrain.data.hf_tokenizer import (  # noqa: E402
    GPTRAIN_TOKENIZER,
    tokenizer_meta_of_choice,
    tokenizer_meta_of_folder,
    tokenizer_part,
)
from gptrain.data.tokenizer import meta_fields, tokenizer_from_meta  # noqa: E402
from gptrain.errors import UserError  # noqa: E402
from gptrain.generation import StreamDecoder  # noqa: E402
from gptrain.hf.gpt2 import GPT2_TOKENIZER_META  # noqa: E402
from gptrain.hf.tokenizer import generation_end_id, tokenizer_files  # noqa: E402

TEXTS = [
    "Hello there, how are you? <|im_end|> and <|eot_id|> typed in a text are characters.",
    "Ünïcödé façade naïve Ångström e\u0301, 日本語のテキスト、中文文本, русский, emoji 🤖🎉 👨‍👩‍👧‍👦 🇫🇷.",
    "  spaces,\ttabs\r\nand\n\n\nnewlines  ",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {name: build_tokenizer_folder(root / name, name) for name in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_folder_reads_as_its_tokenizer(folders, family):
    meta = tokenizer_meta_of_folder(folders[family])
    reference = auto_tokenizer(folders[family])
    generation = json.loads((folders[family] / "generation_config.json").read_text())["eos_token_id"]
    assert meta["tokenizer"] == "hf" and meta["vocab_size"] == len(reference) and meta["dtype"] == "uint16"
    assert meta["eot_token"] == reference.eos_token_id
    assert meta["end_token_ids"] == sorted({*([generation] if isinstance(generation, int) else generation),
                                            reference.eos_token_id})
    assert meta["chat_template"] == reference.chat_template
    assert meta["special_tokens"].items() <= reference.special_tokens_map.items()
    assert meta["tokenizer_json"] == (folders[family] / "tokenizer.json").read_text()
    ours = tokenizer_from_meta(meta)
    for text in TEXTS:  # text is data: special tokens' spellings are characters, and no BOS is added
        ids = reference(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids) == reference.decode(ids)


def test_streamed_tokens_give_the_text_even_where_a_token_splits_a_character(folders):
    ours = tokenizer_from_meta(tokenizer_meta_of_folder(folders["qwen2_5"]))
    text = TEXTS[1] + "<|im_end|>"
    ids = ours.encode_markup(text)
    assert ours.encode_markup("<|im_end|>") == [ours.eot_token]

    def whole(piece: bytes) -> bool:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    assert not all(whole(ours.token_bytes(t)) for t in ids)  # some token holds part of a character
    decoder = StreamDecoder(ours)
    streamed = "".join(decoder.feed(t) for t in ids) + decoder.flush()
    assert streamed == ours.decode(ids) == unicodedata.normalize("NFC", text)  # Qwen's normaliser is NFC


def test_a_folder_without_tokenizer_json_has_no_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert tokenizer_meta_of_folder(tmp_path) is None


def test_where_each_field_comes_from(folders, tmp_path):
    folder = shutil.copytree(folders["llama3"], tmp_path / "llama3")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": template}]
    del config["bos_token"]  # then special_tokens_map.json's, as an AddedToken's mapping
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|begin_of_text|>", "lstrip": False}, "eos_token": "<|end_of_text|>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 404}))  # an id, not a list
    meta = tokenizer_meta_of_folder(folder)
    assert meta["chat_template"] == template
    assert meta["special_tokens"] == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert meta["end_token_ids"] == [404, 405]
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # transformers 5's file comes first
    assert tokenizer_meta_of_folder(folder)["chat_template"] == "{{ messages[0]['content'] }}"
    (folder / "generation_config.json").unlink()
    assert tokenizer_meta_of_folder(folder)["end_token_ids"] == [405]  # the eos alone


def test_a_vocabulary_with_a_gap_counts_up_to_its_largest_id(folders, tmp_path):
    spec = json.loads((folders["qwen2_5"] / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    last = max(vocab, key=vocab.get)  # the last merge's token, which no other merge builds on
    text = tokenizer_from_meta(tokenizer_meta_of_folder(folders["qwen2_5"])).decode([vocab[last]])
    gap = range(vocab[last], 420)
    vocab[last] = 420  # it moves up, leaving ids that no token has
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(folders["qwen2_5"] / "tokenizer_config.json", tmp_path)
    meta = tokenizer_meta_of_folder(tmp_path)
    ours = tokenizer_from_meta(meta)
    assert ours.encode(text) == [420]
    assert meta["vocab_size"] == 421 > ours.tokenizer.get_vocab_size(with_added_tokens=True)  # every id fits below
    assert ours.token_bytes(gap[0]) == b"" and ours.token_bytes(420) == text.encode("utf-8")


# ----- gptrain's own tokenizers through an export -------------------------------------------------------------


def own_bpe_meta(text: str) -> dict:
    tokenizer = train_bpe([text], vocab_size=300)
    return {"tokenizer": "hf-bpe", "vocab_size": tokenizer.vocab_size, "dtype": "uint16", **meta_fields(tokenizer)}


def exported(meta: dict, folder: Path) -> Path:
    folder.mkdir()
    for name, content in tokenizer_files(meta, 64, "test checkpoint").items():
        (folder / name).write_bytes(content)
    return folder


def round_trip_metas(char_dataset, shakespeare_text, folders) -> dict[str, dict]:
    char = json.loads((char_dataset / "meta.json").read_text())
    own = own_bpe_meta(shakespeare_text[:20_000])
    model = tokenizer_meta_of_folder(folders["qwen3"])
    return {"char": char, "own BPE": own, "gpt2": GPT2_TOKENIZER_META,
            "model's template chat": {**model, "chat": jinja_chat_block(), "train_tokens": 1234},
            "char chat": {**tokenizer_part(char), "vocab_size": char["vocab_size"] + 4,
                          "chat": chat_block(char["vocab_size"])},
            "own BPE chat": {**own, "vocab_size": own["vocab_size"] + 4, "chat": chat_block(own["vocab_size"])}}


@pytest.mark.parametrize("kind", ["char", "own BPE", "gpt2", "char chat", "own BPE chat", "model's template chat"])
def test_an_export_reads_back_as_the_tokenizer_it_was_written_from(char_dataset, shakespeare_text, folders, tmp_path,
                                                                   kind):
    meta = round_trip_metas(char_dataset, shakespeare_text, folders)[kind]
    back = tokenizer_meta_of_folder(exported(meta, tmp_path / "export"))
    assert back == tokenizer_part(meta)
    assert generation_end_id(back) == generation_end_id(meta)
    text = shakespeare_text[50_000:52_000]
    assert tokenizer_from_meta(back).encode(text) == tokenizer_from_meta(meta).encode(text)
    again = tokenizer_meta_of_folder(exported(back, tmp_path / "again"))  # import -> export -> import
    assert again == back
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "export" / "tokenizer.json").read_bytes()


def test_an_export_whose_tokenizer_json_changed_reads_as_what_it_holds_now(char_dataset, shakespeare_text, folders,
                                                                          tmp_path):
    meta = round_trip_metas(char_dataset, shakespeare_text, folders)["char"]
    folder = exported(meta, tmp_path / "export")
    spec = json.loads((folder / "tokenizer.json").read_text())  # the same pipeline, written otherwise:
    (folder / "tokenizer.json").write_text(json.dumps(spec, indent=2))  # the record no longer describes the file
    back = tokenizer_meta_of_folder(folder)
    assert back["tokenizer"] == "hf" and back["vocab_size"] == meta["vocab_size"]
    text = shakespeare_text[:3_000]
    ours, original = tokenizer_from_meta(back), tokenizer_from_meta(meta)
    assert ours.encode(text) == original.encode(text)  # the exported pipeline gives gptrain's ids
    decoder = StreamDecoder(ours)  # a character model is not byte-level: it streams a token at a time
    assert "".join(decoder.feed(t) for t in ours.encode(text)) + decoder.flush() == text


def test_the_export_of_a_model_folders_tokenizer_is_the_same_tokenizer(folders, tmp_path):
    source = folders["llama3_2"]
    meta = tokenizer_meta_of_folder(source)
    folder = exported(meta, tmp_path / "export")
    assert (folder / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert tokenizer_meta_of_folder(folder) == meta
    assert generation_end_id(meta) == meta["end_token_ids"] == [401, 404, 405]
    original, export = auto_tokenizer(source), auto_tokenizer(folder)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                    {"role": "assistant", "content": "Four."}, {"role": "user", "content": "Who art thou?"}]
    for options in ({"tokenize": False}, {"tokenize": True, "return_dict": False}):
        assert export.apply_chat_template(conversation, add_generation_prompt=True, **options) == \
            original.apply_chat_template(conversation, add_generation_prompt=True, **options)
    for text in TEXTS:
        assert export(text)["input_ids"] == original(text)["input_ids"]  # the BOS of Llama 3's post-processor too
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config[GPTRAIN_TOKENIZER]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    generic = tokenizer_meta_of_folder(folder)  # without the record: the files alone, which lack generation_config
    assert generic == {**meta, "end_token_ids": [meta["eot_token"]]}


def test_the_gptrain_cli_export_reads_back(trained_run, tmp_path):
    assert run_guarded(main, ["export-hf", "--ckpt", str(trained_run), "--out", str(tmp_path / "export")]) == 0
    from gptrain.checkpoint import find_checkpoint, load_checkpoint

    meta = load_checkpoint(find_checkpoint(trained_run))["dataset_meta"]
    assert tokenizer_meta_of_folder(tmp_path / "export") == tokenizer_part(meta)


# ----- import-hf --tokenizer ----------------------------------------------------------------------------------


def test_a_tokenizer_named_for_a_folder_without_one(folders, tmp_path, shakespeare_text):
    assert tokenizer_meta_of_choice("gpt2") == GPT2_TOKENIZER_META
    assert tokenizer_meta_of_choice(str(folders["qwen3"])) == tokenizer_meta_of_folder(folders["qwen3"])
    (tmp_path / "text.txt").write_text(shakespeare_text[:20_000])
    assert run_guarded(main, ["tokenizer", "train", str(tmp_path / "text.txt"), "--vocab_size", "300", "--out",
                              str(tmp_path / "own")]) == 0
    own = tokenizer_meta_of_choice(str(tmp_path / "own"))
    assert own["tokenizer"] == "hf-bpe" and own["tokenizer_json"] == (tmp_path / "own" / "tokenizer.json").read_text()
    with pytest.raises(UserError, match="char needs the characters"):
        tokenizer_meta_of_choice("char")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        tokenizer_meta_of_choice(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="neither a tokenizer name"):
        tokenizer_meta_of_choice(str(tmp_path / "missing"))


# ----- damaged files: one line through the command line -------------------------------------------------------


def damage(name: str, content):
    def apply(folder: Path) -> None:
        if callable(content):
            data = json.loads((folder / name).read_text())
            content(data)
            (folder / name).write_text(json.dumps(data))
        else:
            (folder / name).write_bytes(content)
    return apply


def set_key(key, value):
    return lambda data: data.__setitem__(key, value)


DAMAGE = {
    "tokenizer.json not JSON": (damage("tokenizer.json", b'{"model": '), "tokenizer.json is not valid JSON"),
    "tokenizer.json not a tokenizer": (damage("tokenizer.json", b'{"model": {"type": "Nope"}}'),
                                       "cannot be loaded by tokenizers"),
    "tokenizer.json not UTF-8": (damage("tokenizer.json", b"\xff\xfe"), "tokenizer.json is not UTF-8"),
    "tokenizer_config.json not JSON": (damage("tokenizer_config.json", b"{"), "tokenizer_config.json is not valid"),
    "tokenizer_config.json a list": (damage("tokenizer_config.json", b"[]"), "must hold a JSON object"),
    "eos not a token": (damage("tokenizer_config.json", set_key("eos_token", "<|nope|>")),
                        "the eos_token '<|nope|>' is not one of its tokens"),
    "eos a number": (damage("tokenizer_config.json", set_key("eos_token", 7)), "eos_token must be a token's spelling"),
    "template a number": (damage("tokenizer_config.json", set_key("chat_template", 3)),
                          "chat_template must be a Jinja template"),
    "templates without a default": (damage("tokenizer_config.json",
                                           set_key("chat_template", [{"name": "rag", "template": "x"}])),
                                    'none named "default"'),
    "special_tokens_map.json not JSON": (damage("special_tokens_map.json", b"{,}"), "special_tokens_map.json"),
    "generation eos a word": (damage("generation_config.json", set_key("eos_token_id", "end")),
                              "eos_token_id must be a token id or a list"),
    "generation eos too large": (damage("generation_config.json", set_key("eos_token_id", [401, 99_999])),
                                 "must be below the vocabulary's 406"),
    "chat_template.jinja not UTF-8": (damage("chat_template.jinja", b"\xc3("), "chat_template.jinja is not UTF-8"),
    "record damaged": (damage("tokenizer_config.json", set_key(GPTRAIN_TOKENIZER, [1])),
                       f"{GPTRAIN_TOKENIZER} is damaged"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_tokenizer_files_are_one_line(folders, tmp_path, capsys, case):
    breakage, fragment = DAMAGE[case]
    folder = shutil.copytree(folders["llama3_2"], tmp_path / "model")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64, "n_embd": 32,
                                                    "n_layer": 1, "n_head": 2, "vocab_size": 406}))
    breakage(folder)
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": "hello"}]}))
    code = run_guarded(main, ["prepare", "chat", str(tmp_path / "chats.jsonl"), "--out", str(tmp_path / "data"),
                              "--tokenizer", f"from:{folder}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert "Traceback" not in err and not (tmp_path / "data").exists()


def test_the_test_folders_import_no_torch_for_their_tokenizer(folders):
    """The data layer reads a model's tokenizer without torch, as data preparation does."""
    import subprocess

    code = (f"import sys; from gptrain.data.hf_tokenizer import tokenizer_meta_of_folder; "
            f"tokenizer_meta_of_folder({str(folders['qwen2_5'])!r}); assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
