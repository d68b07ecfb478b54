"""Train your own byte-level BPE (hf_bpe.py's pipeline) with Hugging Face `tokenizers`, from an iterator of texts:
the trainer counts each pre-token as the texts stream past, so the corpus is never in memory at once."""

from __future__ import annotations

from collections.abc import Iterable

from gptrain.data.hf_bpe import ENDOFTEXT, PATTERNS, OwnBPETokenizer, byte_of_symbol, import_tokenizers, untrained_bpe
from gptrain.errors import UserError

SPECIAL_TOKENS = (ENDOFTEXT,)
SMALLEST_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, and the special tokens
LARGEST_VOCAB = 2**32  # ids are stored as at most uint32


def check_vocab_size(vocab_size: int) -> None:
    if not SMALLEST_VOCAB <= vocab_size <= LARGEST_VOCAB:
        raise UserError(f"--vocab_size must be between {SMALLEST_VOCAB} (the 256 bytes and {ENDOFTEXT}) and "
                        f"{LARGEST_VOCAB:,}, got {vocab_size}")


def check_pattern(pattern: str) -> None:
    if pattern not in PATTERNS:
        raise UserError(f"--pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = "gpt4") -> OwnBPETokenizer:
    """A BPE of at most vocab_size tokens (fewer when the text has no more pairs to merge) learned from texts."""
    check_vocab_size(vocab_size)
    check_pattern(pattern)
    tokenizer = untrained_bpe(pattern)
    trainer = import_tokenizers().trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=sorted(byte_of_symbol()),  # all 256 bytes, even those the text lacks: nothing is unknown
        show_progress=False,  # the caller shows progress over the texts it reads
    )
    tokenizer.train_from_iterator(texts, trainer)
    return OwnBPETokenizer(tokenizer.to_str(), "the trained tokenizer")
