"""Your own byte-level BPE: exact round trips in every script, <|endoftext|> reserved, and the meta.json contract
(the tokenizer travels whole with its sha256; a damaged copy, or another tokenizer, is refused)."""

import hashlib
import json
import shutil
import unicodedata

import numpy as np
import pytest
from conftest import prepare_text

from gptrain.data.bpe_training import train_bpe
from gptrain.data.dataset import check_same_tokenizer, load_meta, tokenizer_identity, validate_meta
from gptrain.data.hf_bpe import ENDOFTEXT, byte_of_symbol
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.errors import UserError

tokenizers = pytest.importorskip("tokenizers")

# One line per script or kind of character; none of it is in the English training text.
EVERY_SCRIPT = "\n".join([
    "Příliš žluťoučký kůň úpěl ďábelské ódy; naïve façade, Straße, Ĳsselmeer, Œuvre",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία",
    "Съешь же ещё этих мягких французских булок, да выпей чаю",
    "Բարեւ աշխարհ · გამარჯობა მსოფლიო · ሰላም ለዓለም · ᏣᎳᎩ · ᠮᠣᠩᠭᠣᠯ",
    "نص حكيم له سر قاطع وذو شأن عظيم، العَرَبِيَّة ١٢٣",
    "דג סקרן שט בים מאוכזב, שָׁלוֹם",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश ०१२ · আমি বাংলায় গান গাই · யாமறிந்த மொழிகளிலே",
    "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า · ສະບາຍດີ · សួស្តី\u200bពិភពលោក · བཀྲ་ཤིས་བདེ་ལེགས།",
    "我能吞下玻璃而不伤身体。們國說 · いろはにほへと ちりぬるを カタカナ",
    "다람쥐 헌 쳇바퀴에 타고파 · \u1112\u119e\u11ab",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐌰𐌱𐌲 𓀀 𒀀 ᚠᛇᚻ",
    "👨\u200d👩\u200d👧\u200d👦 🏳\ufe0f\u200d🌈 🇯🇵 👍🏽 1\ufe0f\u20e3 🤖",
    "e\u0301 a\u0308\u0301 Z\u0324\u033a\u0308 \u00a0\t\r\n\ufeff\u200f\ue000\U0010fffd\x00 <|endoftext|> 12345",
])
SCRIPTS = ("LATIN", "GREEK", "CYRILLIC", "ARMENIAN", "GEORGIAN", "ETHIOPIC", "CHEROKEE", "MONGOLIAN", "ARABIC",
           "HEBREW", "DEVANAGARI", "BENGALI", "TAMIL", "THAI", "LAO", "KHMER", "TIBETAN", "CJK UNIFIED", "HIRAGANA",
           "KATAKANA", "HANGUL", "MATHEMATICAL FRAKTUR", "GOTHIC", "EGYPTIAN HIEROGLYPH", "CUNEIFORM", "RUNIC",
           "ZERO WIDTH JOINER", "REGIONAL INDICATOR", "EMOJI MODIFIER", "COMBINING", "VARIATION SELECTOR")


@pytest.fixture(scope="module")
def english_bpe(shakespeare_text):
    return train_bpe([shakespeare_text[:100_000]], vocab_size=400)


def test_the_test_text_covers_every_script_it_names():
    names = {unicodedata.name(ch, "") for ch in EVERY_SCRIPT}
    missing = [s for s in SCRIPTS if not any(s in name for name in names)]
    assert not missing


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_every_script_round_trips_exactly(shakespeare_text, pattern):
    bpe = train_bpe([shakespeare_text[:100_000]], vocab_size=400, pattern=pattern)
    ids = bpe.encode(EVERY_SCRIPT)
    assert bpe.decode(ids) == EVERY_SCRIPT
    assert b"".join(bpe.token_bytes(t) for t in ids) == EVERY_SCRIPT.encode("utf-8")
    assert bpe.eot_token not in ids  # "<|endoftext|>" in the text is text, not the separator


def test_a_tokenizer_trained_on_many_scripts_round_trips_them(shakespeare_text, english_bpe):
    bpe = train_bpe([shakespeare_text[:20_000], EVERY_SCRIPT * 20], vocab_size=1500)
    ids = bpe.encode(EVERY_SCRIPT)
    assert bpe.decode(ids) == EVERY_SCRIPT
    assert len(ids) < len(english_bpe.encode(EVERY_SCRIPT)) / 2  # it learned merges in the other scripts


def test_endoftext_is_reserved_and_the_vocabulary_is_as_asked(english_bpe):
    assert english_bpe.vocab_size == 400
    assert english_bpe.tokenizer.id_to_token(english_bpe.eot_token) == ENDOFTEXT
    assert english_bpe.token_bytes(english_bpe.eot_token) == ENDOFTEXT.encode()
    assert english_bpe.decode([english_bpe.eot_token]) == ENDOFTEXT
    # every byte is a token of its own, so no text is unknown
    singles = {english_bpe.token_bytes(t) for t in range(english_bpe.vocab_size) if t != english_bpe.eot_token}
    assert {bytes([b]) for b in range(256)} <= singles


def test_byte_map_is_the_librarys():
    assert set(byte_of_symbol()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert sorted(byte_of_symbol().values()) == list(range(256))


def test_same_text_same_tokenizer(shakespeare_text):
    """Training is deterministic: the same text gives the same tokenizer.json, so the same sha256."""
    first = train_bpe([shakespeare_text[:50_000]], vocab_size=350)
    second = train_bpe([shakespeare_text[:50_000]], vocab_size=350)
    assert first.sha256 == second.sha256


def own_dataset(tmp_path, bpe, text, name="data"):
    (tmp_path / "tok").mkdir(parents=True, exist_ok=True)
    (tmp_path / "tok" / "tokenizer.json").write_text(bpe.json, encoding="utf-8")
    return prepare_text(text, tmp_path / name, str(tmp_path / "tok"))


def test_meta_carries_the_tokenizer_whole(tmp_path, english_bpe, shakespeare_text):
    meta = own_dataset(tmp_path, english_bpe, shakespeare_text[:30_000])
    assert meta["tokenizer"] == "hf-bpe" and meta["vocab_size"] == 400 and meta["dtype"] == "uint16"
    assert meta["tokenizer_json"] == english_bpe.tokenizer.to_str()
    assert meta["eot_token"] == english_bpe.tokenizer.token_to_id(ENDOFTEXT)
    assert meta["tokenizer_sha256"] == hashlib.sha256(meta["tokenizer_json"].encode("utf-8")).hexdigest()
    rebuilt = tokenizer_from_meta(load_meta(tmp_path / "data"))
    text = shakespeare_text[:30_000]
    cut = int(len(text) * 0.9)  # one document: split by position, as with the other tokenizers
    train = np.fromfile(tmp_path / "data" / "train.bin", dtype="uint16").tolist()
    assert train == english_bpe.encode(text[:cut]) == rebuilt.encode(text[:cut])
    assert rebuilt.decode(train) == text[:cut]


def test_a_damaged_tokenizer_in_meta_is_refused(tmp_path, english_bpe, shakespeare_text):
    meta = own_dataset(tmp_path, english_bpe, shakespeare_text[:30_000])
    spec = json.loads(meta["tokenizer_json"])
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids now mean each other's text
    damaged = {**meta, "tokenizer_json": json.dumps(spec)}
    with pytest.raises(UserError, match="does not match tokenizer_sha256"):
        validate_meta(damaged, "ckpt.pt")
    with pytest.raises(UserError, match="does not match tokenizer_sha256"):
        tokenizer_from_meta(damaged)
    for key in ("tokenizer_json", "tokenizer_sha256", "eot_token"):
        with pytest.raises(UserError, match="needs tokenizer_json, tokenizer_sha256 and eot_token"):
            validate_meta({k: v for k, v in meta.items() if k != key}, "meta.json")
    with pytest.raises(UserError, match="are not the tokenizer's"):
        tokenizer_from_meta({**meta, "eot_token": 5})


def test_another_own_tokenizer_is_told_apart(tmp_path, english_bpe, shakespeare_text):
    meta = own_dataset(tmp_path, english_bpe, shakespeare_text[:30_000])
    other_bpe = train_bpe([shakespeare_text[100_000:200_000]], vocab_size=400)
    other = own_dataset(tmp_path / "o", other_bpe, shakespeare_text[:30_000])
    assert tokenizer_identity(meta) != tokenizer_identity(other)
    assert tokenizer_identity(meta) == tokenizer_identity(json.loads((tmp_path / "data" / "meta.json").read_text()))
    with pytest.raises(UserError, match="another own tokenizer"):
        check_same_tokenizer(meta, other, "ckpt.pt")


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, shakespeare_text):
    """A tiny model trained on a dataset prepared with a tokenizer trained by scripts/train_tokenizer.py; the
    dataset and tokenizer folders are deleted afterwards, so only the run is left."""
    from conftest import TINY

    from gptrain.config import build_config
    from gptrain.data.bpe_training import train_tokenizer
    from gptrain.data.prepare import prepare_dataset
    from gptrain.train import train

    root = tmp_path_factory.mktemp("own_run")
    (root / "text.txt").write_text(shakespeare_text[:60_000], encoding="utf-8")
    train_tokenizer([root / "text.txt"], root / "tok", vocab_size=320)
    prepare_dataset([root / "text.txt"], root / "data", str(root / "tok"), workers=2)
    train(build_config({**TINY, "dataset": str(root / "data"), "out_dir": str(root / "run"), "max_iters": 6,
                        "eval_interval": 6}))
    kept = tmp_path_factory.mktemp("kept")
    shutil.copytree(root / "data", kept / "data")  # for the refusal test, out of the run's way
    shutil.copytree(root / "tok", kept / "tok")
    shutil.rmtree(root / "data")
    shutil.rmtree(root / "tok")
    return root / "run", kept


def test_sample_and_eval_from_the_checkpoint_alone(own_run, tmp_path, capsys):
    from gptrain.cli import main, run_guarded

    run, kept = own_run
    capsys.readouterr()
    prompt = "ROMEO: 你好 👨\u200d👩\u200d👧"  # characters the tokenizer never saw: bytes, still exact
    assert run_guarded(main, ["sample", "--ckpt", str(run), "--start", prompt, "--num_samples", "1",
                              "--max_new_tokens", "12", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and len(out) > len(prompt)
    text = tmp_path / "eval.txt"
    text.write_text("KING RICHARD: Now is the winter of our discontent.\n" * 20, encoding="utf-8")
    assert run_guarded(main, ["eval", "--ckpt", str(run), "--text", str(text), "--device", "cpu"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    # Every token but the first is scored, and its bytes come from the tokenizer's token_bytes: exact.
    tokenizer = tokenizer_from_meta(load_meta(kept / "data"))
    first = tokenizer.token_bytes(tokenizer.encode(text.read_text())[0])
    assert row[0] == str(text) and int(row[2].replace(",", "")) == len(text.read_bytes()) - len(first)


def test_resuming_on_a_dataset_of_another_own_tokenizer_is_refused(own_run, tmp_path, capsys, shakespeare_text):
    from conftest import TINY, write_config

    from gptrain.cli import main, run_guarded
    from gptrain.data.bpe_training import train_tokenizer

    run, kept = own_run
    (tmp_path / "text.txt").write_text(shakespeare_text[200_000:260_000], encoding="utf-8")
    train_tokenizer([tmp_path / "text.txt"], tmp_path / "tok", vocab_size=320)  # same size, other merges
    other = prepare_text(shakespeare_text[:60_000], tmp_path / "other", str(tmp_path / "tok"))
    assert other["vocab_size"] == 320 and other["tokenizer_sha256"] != load_meta(kept / "data")["tokenizer_sha256"]
    capsys.readouterr()
    config = write_config(tmp_path, tmp_path / "other", **{**TINY, "init_from": f"from:{run}"})
    assert run_guarded(main, ["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "was trained with another own tokenizer" in err and "prepare the dataset with the model's" in err


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_encoding_in_segments_gives_the_librarys_ids(shakespeare_text, monkeypatch, pattern):
    from gptrain.data import hf_bpe

    bpe = train_bpe([shakespeare_text[:100_000]], vocab_size=400, pattern=pattern)
    text = shakespeare_text[100_000:130_000] + EVERY_SCRIPT + "a.\nb, c!\n\nd\n"
    monkeypatch.setattr(hf_bpe, "SEGMENT_CHARS", 200)  # ~150 segments
    assert len(list(hf_bpe.segments(text))) > 100
    assert bpe.encode(text) == bpe.tokenizer.encode(text, add_special_tokens=False).ids
