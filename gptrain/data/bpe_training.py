"""Train your own byte-level BPE (hf_bpe.py's pipeline) with Hugging Face `tokenizers` on the inputs prepare_text.py
reads (readers.py). The texts stream into the trainer, which counts each pre-token as they pass, so the corpus
is never in memory at once; what the trainer keeps is one count per distinct pre-token."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from gptrain.data.hf_bpe import ENDOFTEXT, PATTERNS, OwnBPETokenizer, byte_of_symbol, import_tokenizers, untrained_bpe
from gptrain.data.readers import ReadOptions, Source, expand_inputs, iter_pieces, size_estimate
from gptrain.errors import UserError
from gptrain.runtime import names, outdir
from gptrain.runtime.child import run_in_child
from gptrain.runtime.files import kind_of
from gptrain.runtime.publish import staged

SPECIAL_TOKENS = (ENDOFTEXT,)
SMALLEST_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, and the special tokens
LARGEST_VOCAB = 2**32  # ids are stored as at most uint32
OUTPUT_FILES = names.TOKENIZER_TRAINING_FILES


@dataclass
class Corpus:
    """What the trainer read, counted as the texts stream past."""

    documents: int = 0
    characters: int = 0
    bytes: int = 0


def check_settings(vocab_size: int, pattern: str, max_chars: int | None) -> None:
    if not SMALLEST_VOCAB <= vocab_size <= LARGEST_VOCAB:
        raise UserError(f"--vocab_size must be between {SMALLEST_VOCAB} (the 256 bytes and {ENDOFTEXT}) and "
                        f"{LARGEST_VOCAB:,}, got {vocab_size}")
    if pattern not in PATTERNS:
        raise UserError(f"--pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    if max_chars is not None and max_chars < 1:
        raise UserError(f"--max_chars must be at least 1, got {max_chars}")


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = "gpt4") -> OwnBPETokenizer:
    """A BPE of at most vocab_size tokens (fewer when the text has no more pairs to merge) learned from texts."""
    check_settings(vocab_size, pattern, None)
    tokenizer = untrained_bpe(pattern)
    trainer = import_tokenizers().trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=sorted(byte_of_symbol()),  # all 256 bytes, even those the text lacks: nothing is unknown
        show_progress=False,  # the caller shows progress over the texts it reads
    )
    tokenizer.train_from_iterator(texts, trainer)
    return OwnBPETokenizer(tokenizer.to_str(), "the trained tokenizer")


def corpus_texts(sources: list[Source], options: ReadOptions, max_chars: int | None, corpus: Corpus) -> Iterator[str]:
    """The inputs' texts, at most max_chars characters in all, with a progress bar in bytes."""
    sizes = [size_estimate(source, options) for source in sources]
    total = None if None in sizes else sum(sizes)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", delay=1.0) as bar:
        for piece in iter_pieces(sources, options):
            text = piece.text if max_chars is None else piece.text[: max_chars - corpus.characters]
            size = len(text.encode("utf-8"))
            corpus.characters += len(text)
            corpus.bytes += size
            corpus.documents += piece.last
            bar.update(size)
            yield text
            if corpus.characters == max_chars:
                break
        bar.set_postfix_str("read; merging pairs", refresh=False)


def check_out(out: Path, overwrite: bool, settings: dict) -> None:
    """Refuse, before any training, an --out that would lose something: a file, or a folder holding anything but
    the output of this very command (which, run again, leaves it as it is: publish_tokenizer checks the bytes)."""
    outdir.check_creatable(out, "--out")
    for name in OUTPUT_FILES:
        if kind_of(out / name) not in (None, "file"):
            raise UserError(f"{out / name} is a folder or a device, where the tokenizer goes; choose another --out")
    if kind_of(out) != "dir" or overwrite:
        return
    others = [p.name for p in out.iterdir() if p.name not in (names.LOCK_NAME, *OUTPUT_FILES)]
    if others or (any((out / name).exists() for name in OUTPUT_FILES) and not trained_alike(out, settings)):
        what = f"it holds {', '.join(sorted(others)[:3])}" if others else "it holds another tokenizer"
        raise UserError(f"--out {out} is not empty ({what}); choose another folder, or pass --overwrite to replace "
                        f"{' and '.join(OUTPUT_FILES)} there")


def trained_alike(out: Path, settings: dict) -> bool:
    """Whether out's training.json records these settings: the same command, run before."""
    try:
        info = json.loads((out / "training.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and all(info.get(key) == value for key, value in settings.items())


def train_tokenizer(inputs: list[Path], out: Path, vocab_size: int, pattern: str = "gpt4",
                    options: ReadOptions | None = None, max_chars: int | None = None,
                    overwrite: bool = False) -> tuple[dict, bool]:
    """Train on the inputs and write out/tokenizer.json and out/training.json (how it was trained); returns the
    latter's content, and whether out already held this very tokenizer (then nothing was written)."""
    check_settings(vocab_size, pattern, max_chars)
    options = options or ReadOptions()
    sources, start = expand_inputs(inputs), time.perf_counter()
    settings = {"asked_vocab_size": vocab_size, "pattern": pattern, "inputs": [str(source) for source in sources],
                "max_chars": max_chars, **asdict(options)}
    check_out(out, overwrite, settings)
    with outdir.claimed(out, "--out"):
        check_out(out, overwrite, settings)  # again, now that no other process can write there
        # In a child process: the trainer's merging runs in native code for minutes, out of reach of signals.
        tokenizer_json, corpus = run_in_child(train_on_inputs, sources, options, max_chars, vocab_size, pattern)
        if corpus.characters == 0:
            raise UserError(f"no text in {', '.join(map(str, inputs))}; give inputs with some text in them")
        tokenizer = OwnBPETokenizer(tokenizer_json, "the trained tokenizer")
        info = {"vocab_size": tokenizer.vocab_size, "eot_token": tokenizer.eot_token,
                "tokenizer_sha256": tokenizer.sha256, **settings, **asdict(corpus),
                "seconds": round(time.perf_counter() - start, 1)}
        return info, publish_tokenizer(out, tokenizer, info, overwrite)


def publish_tokenizer(out: Path, tokenizer: OwnBPETokenizer, info: dict, overwrite: bool) -> bool:
    """Publish tokenizer.json with training.json; True when out already held this tokenizer (nothing written)."""
    with staged(out, OUTPUT_FILES) as stage:
        stage.write("tokenizer.json", tokenizer.json.encode("utf-8"))
        stage.write("training.json", json.dumps(info, indent=1, ensure_ascii=False).encode("utf-8"))
        if not overwrite and any(kind_of(out / name) is not None for name in OUTPUT_FILES):
            if stage.holds_the_target(["tokenizer.json"]):  # training.json differs in its seconds only
                return True
            raise UserError(f"--out {out} is not empty (it holds another tokenizer); choose another folder, or pass "
                            "--overwrite to replace it")
        stage.publish()
    return False


def train_on_inputs(sources: list[Source], options: ReadOptions, max_chars: int | None, vocab_size: int,
                    pattern: str) -> tuple[str, Corpus]:
    """The trained tokenizer's JSON and what it read (run in a child process by train_tokenizer)."""
    # A thread lock for the progress bar: tqdm's default one is a multiprocessing lock, which the parent's
    # resource tracker reports as leaked when this process is killed.
    tqdm.set_lock(threading.RLock())
    corpus = Corpus()
    tokenizer = train_bpe(corpus_texts(sources, options, max_chars, corpus), vocab_size, pattern)
    return tokenizer.json, corpus


def describe_training(info: dict, out: Path, unchanged: bool = False) -> str:
    """What train_tokenizer.py prints when it is done."""
    fewer = (f" (asked for {info['asked_vocab_size']:,}: the text has no more pairs to merge)"
             if info["vocab_size"] < info["asked_vocab_size"] else "")
    return (f"a byte-level BPE of {info['vocab_size']:,} tokens{fewer}, pattern {info['pattern']}, "
            f"{ENDOFTEXT} = {info['eot_token']}\n"
            f"trained on {info['documents']:,} documents, {info['characters']:,} characters ({info['bytes']:,} bytes) "
            f"in {info['seconds']} s\n"
            + (f"{out} already held this tokenizer: left unchanged" if unchanged else
               f"wrote {out}/tokenizer.json (sha256 {info['tokenizer_sha256'][:16]}...) and training.json")
            + f"; use it with gptrain prepare text --tokenizer {out}")
