"""Batches of preference pairs for DPO, from a preference dataset (data/preference_prepare.py writes it): the
files of a chat dataset (data/chat_batches.py), with or without a chat template, whose meta.json also says
`"preference": true` and `"pairs": {"train": N, "val": M}`. Sequence 2i of a split is pair i's chosen sequence (its
prompt, then the chosen answer), 2i + 1 its rejected one; both start with the same prompt tokens, and the mask
counts the answers' tokens only.

A micro-batch of B pairs is 2B rows, the B chosen sequences then the B rejected ones (TRL's layout), each alone in
its row and padded after its end to the batch's longest sequence. DPO needs every sequence whole, so the chat
path's windows, which cut a conversation at block_size, do not apply; and the two sequences of a pair, with one
prompt and answers in one style, are about as long as each other, so padding to the longest costs little and
keeps plain causal attention, whose kernel a dense packing mask would give up (docs/chat.md, Packing or padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptrain.data.chat_batches import IGNORE, ChatSplit
from gptrain.data.dataset import ChunkedDraws, to_device
from gptrain.errors import UserError

PAD = 0  # the input id after a sequence's end: causal attention keeps it from the sequence, its targets are IGNORE


@dataclass
class PreferenceSplit:
    """One split of a preference dataset: its conversations, read as pairs."""

    name: str  # "train" or "val": which split a pair index belongs to (the stored reference is kept per split)
    chat: ChatSplit

    @property
    def pairs(self) -> int:
        return self.chat.conversations // 2

    def batch(self, pairs: np.ndarray, device: torch.device) -> PairBatch:
        """The pairs' sequences as one padded batch, chosen rows first."""
        sequences = [self.chat.conversation(int(2 * i + side)) for side in (0, 1) for i in pairs]
        width = max(len(ids) for ids, _ in sequences) - 1
        x = np.full((len(sequences), width), PAD, dtype=np.int64)
        y = np.full((len(sequences), width), IGNORE, dtype=np.int64)
        for row, (ids, counted) in enumerate(sequences):
            x[row, : len(ids) - 1] = ids[:-1]
            y[row, : len(ids) - 1] = np.where(counted[1:], ids[1:], IGNORE)
        return PairBatch(to_device(torch.from_numpy(x), device), to_device(torch.from_numpy(y), device),
                         torch.from_numpy(np.asarray(pairs, dtype=np.int64)), self.name)


@dataclass
class PairBatch:
    x: torch.Tensor  # (2B, L) inputs: B chosen sequences, then the same pairs' B rejected ones
    y: torch.Tensor  # (2B, L) targets, IGNORE where the mask does not count a token and after a sequence's end
    pairs: torch.Tensor  # (B,) the pairs' indices in their split, on the host
    split: str


def open_preference_split(folder: Path, meta: dict, chat: ChatSplit, split: str, block_size: int) -> PreferenceSplit:
    """A chat split read as pairs, checked against meta.json's count and the pair format."""
    pairs = meta.get("pairs", {}).get(split) if isinstance(meta.get("pairs"), dict) else None
    where = f"{folder / f'{split}_docs.bin'}"
    if not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 1 or chat.conversations != 2 * pairs:
        raise UserError(f"{where} holds {chat.conversations} sequences, and meta.json's pairs.{split} is {pairs!r}: a "
                        "preference dataset holds two sequences (chosen, rejected) per pair; prepare it again")
    check_pairs(chat, where, block_size)
    return PreferenceSplit(split, chat)


def check_pairs(chat: ChatSplit, where: str, block_size: int) -> None:
    """Every sequence has a prompt and an answer and fits the model's context; a pair's two sequences share their
    prompt."""
    ends = np.append(chat.starts[1:], chat.tokens.num_tokens)
    counted_at = np.flatnonzero(chat.mask)
    # Each sequence's first counted token (one past the file's last counted token when it has none).
    first_counted = np.append(counted_at, chat.tokens.num_tokens)[np.searchsorted(counted_at, chat.starts)]
    if (first_counted >= ends).any() or (first_counted <= chat.starts).any():
        raise UserError(f"{where}: a sequence has no prompt or no answer the mask counts; prepare the dataset again")
    longest = int((ends - chat.starts).max())
    if longest - 1 > block_size:
        raise UserError(f"{where}: a sequence is {longest} tokens, and DPO reads each one whole: block_size must be "
                        f"at least {longest - 1}")
    prompt_lengths = (first_counted - chat.starts).reshape(-1, 2)  # (pairs, 2): chosen, rejected
    starts = chat.starts.reshape(-1, 2)
    tokens = np.memmap(chat.tokens.path, dtype=chat.tokens.dtype, mode="r")
    for first in range(0, len(starts), PAIRS_PER_CHECK):
        lengths, pair_starts = prompt_lengths[first: first + PAIRS_PER_CHECK], starts[first: first + PAIRS_PER_CHECK]
        differ = lengths[:, 0] != lengths[:, 1]
        differ |= prompts_differ(tokens, pair_starts, np.where(differ, 0, lengths[:, 0]))
        if differ.any():
            raise UserError(f"{where}: pair {first + int(np.argmax(differ))}'s chosen and rejected sequences start "
                            "with different prompts; prepare the dataset again")


PAIRS_PER_CHECK = 1 << 14  # pairs compared at a time, which bounds the index arrays (8 bytes a prompt token each)


def prompts_differ(tokens: np.ndarray, pair_starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(pairs,) bool: whether the first `lengths` tokens of a pair's two sequences differ anywhere."""
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    chosen, rejected = (np.repeat(pair_starts[:, side], lengths) + within for side in (0, 1))
    pair_of = np.repeat(np.arange(len(lengths)), lengths)
    return np.bincount(pair_of[tokens[chosen] != tokens[rejected]], minlength=len(lengths)) > 0


class PreferenceBatchSampler(ChunkedDraws):
    """PairBatches of `batch_size` pairs drawn at random (with replacement, as the chat path draws conversations),
    a chunk of `chunk_batches` batches at a time; its state is saved as BatchSampler's is (ChunkedDraws)."""

    CHUNK = 8  # batches per chunk of an evaluation stream, as BatchSampler's

    def __init__(self, split: PreferenceSplit, batch_size: int, seed: int, device: torch.device,
                 chunk_batches: int = CHUNK):
        self.split, self.batch_size, self.device, self.chunk_batches = split, batch_size, device, chunk_batches
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._chunk: list[np.ndarray] = []  # the pair indices of the batches not used yet
        self._chunk_state = self.rng.bit_generator.state
        self._used = 0

    def _draw_chunk(self) -> None:
        self._chunk_state = self.rng.bit_generator.state
        pairs = self.rng.integers(0, self.split.pairs, size=(self.chunk_batches, self.batch_size))
        self._chunk = list(pairs)
        self._used = 0

    def prefetch(self) -> None:
        if not self._chunk:
            self._draw_chunk()

    def next_batch(self) -> PairBatch:
        self.prefetch()
        pairs = self._chunk.pop(0)
        self._used += 1
        return self.split.batch(pairs, self.device)
