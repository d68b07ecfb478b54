"""Training batches from a chat dataset (data/chat.py describes its files): conversations packed into block_size
windows, with the loss counting the tokens the mask marks (the assistant's answers) and nothing else.

A window starts at the first token of a random conversation and runs on through the conversations that follow it
in the file, block_size + 1 tokens in all; the last one may be cut short (its beginning is there, so what the
window holds of it is still trained correctly). Every token carries its position within its own conversation,
restarting at 0 where a conversation starts: GPT.forward then keeps attention within each conversation (a
block-diagonal causal mask for scaled_dot_product_attention) and numbers each conversation from 0, as it is
numbered when the model is prompted. Targets the mask does not count are -1, the loss's ignore index; so is the
first token of every conversation, which nothing before it predicts.

docs/measurements.md gives the measurements behind packing (rather than one conversation per
row, padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptrain.data.dataset import ChunkedDraws, TokenFile, check_enough_tokens, to_device
from gptrain.errors import UserError
from gptrain.runtime.files import kind_of

IGNORE = -1  # the target the loss skips (GPT.forward's ignore_index)


def is_chat(meta: dict) -> bool:
    return "chat" in meta


@dataclass
class ChatSplit:
    """One split of a chat dataset: its tokens, which of them are counted targets, and where conversations start."""

    tokens: TokenFile
    mask: np.ndarray  # (N,) uint8, memory-mapped: 1 where the loss counts the token as a target
    starts: np.ndarray  # (D,) int64: the offset of each conversation's first token, ascending from 0

    @property
    def conversations(self) -> int:
        return len(self.starts)

    def conversation(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Conversation `index`'s token ids (int64) and mask (bool)."""
        start = int(self.starts[index])
        end = int(self.starts[index + 1]) if index + 1 < len(self.starts) else self.tokens.num_tokens
        ids = self.tokens.gather(np.array([start]), end - start)[0]
        return ids, self.mask[start:end].astype(bool)


def open_chat_split(folder: Path, split: str, tokens: TokenFile) -> ChatSplit:
    """The mask and the conversation offsets beside a split's tokens, checked against them."""
    mask_path, starts_path = folder / f"{split}_mask.bin", folder / f"{split}_docs.bin"
    for path in (mask_path, starts_path):
        if kind_of(path) != "file":
            raise UserError(f"{path} is missing (or not a file); a chat dataset holds {split}.bin, {split}_mask.bin "
                            f"and {split}_docs.bin: prepare it again with gptrain prepare chat")
    mask = np.memmap(mask_path, dtype=np.uint8, mode="r") if mask_path.stat().st_size else np.zeros(0, np.uint8)
    if len(mask) != tokens.num_tokens:
        raise UserError(f"{mask_path} holds {len(mask)} mask bytes for the {tokens.num_tokens} tokens of "
                        f"{tokens.path}; the files do not belong together, prepare the dataset again")
    if len(mask) and int(mask.max()) > 1:
        raise UserError(f"{mask_path}: a mask byte is {int(mask.max())}; each must be 0 or 1, prepare the dataset "
                        "again")
    return ChatSplit(tokens, mask, read_starts(starts_path, tokens.num_tokens))


def read_starts(path: Path, num_tokens: int) -> np.ndarray:
    size = path.stat().st_size
    if size == 0 or size % 8:
        raise UserError(f"{path} has {size} bytes, not a whole number of int64 offsets (at least one); prepare the "
                        "dataset again")
    starts = np.fromfile(path, dtype=np.int64)
    if starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= num_tokens:
        raise UserError(f"{path}: the conversation offsets must ascend from 0 and stay below the {num_tokens} "
                        "tokens of the split; prepare the dataset again")
    return starts


class ChatBatchSampler(ChunkedDraws):
    """Batches (x, y, position_ids), each (B, T), of windows starting at random conversations.

    Windows are drawn a chunk of `chunk_batches` batches at a time. The training stream draws one optimizer step's
    micro-batches per chunk, so the tokens a whole step counts are known before its first backward pass
    (counted_targets). Its state is saved as BatchSampler's is (ChunkedDraws)."""

    CHUNK = 8  # batches per chunk of an evaluation stream, as BatchSampler's

    def __init__(self, split: ChatSplit, batch_size: int, block_size: int, seed: int, device: torch.device,
                 chunk_batches: int = CHUNK):
        check_enough_tokens(split.tokens, block_size)
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.device, self.chunk_batches = device, chunk_batches
        # Conversations a whole window can start at (a window is block_size + 1 tokens; the first always fits).
        self.window_starts = split.starts[split.starts <= split.tokens.num_tokens - block_size - 1]
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._chunk: list[tuple[torch.Tensor, ...]] = []  # batches not used yet: (x, y, position_ids, counted)
        self._chunk_state = self.rng.bit_generator.state
        self._used = 0

    def _draw_chunk(self) -> None:
        self._chunk_state = self.rng.bit_generator.state
        starts = self.window_starts[self.rng.integers(0, len(self.window_starts),
                                                      size=self.chunk_batches * self.batch_size)]
        ids = self.split.tokens.gather(starts, self.block_size + 1)  # (N, T + 1)
        offsets = starts[:, None] + np.arange(self.block_size + 1)  # (N, T + 1): each token's place in the file
        counted = self.split.mask[offsets[:, 1:]].astype(bool)  # (N, T): is target j counted?
        targets = np.where(counted, ids[:, 1:], IGNORE)  # (N, T)
        conversation = np.searchsorted(self.split.starts, offsets[:, :-1], side="right") - 1  # (N, T)
        positions = offsets[:, :-1] - self.split.starts[conversation]  # (N, T): 0 where a conversation starts
        shape = (self.chunk_batches, self.batch_size, self.block_size)
        x, y, pos = (torch.from_numpy(np.ascontiguousarray(a)).view(shape) for a in (ids[:, :-1], targets, positions))
        counts = torch.from_numpy(counted.reshape(self.chunk_batches, -1).sum(axis=1))  # (chunk_batches,)
        self._chunk = list(zip(x.unbind(0), y.unbind(0), pos.unbind(0), counts.unbind(0)))
        self._used = 0

    def prefetch(self) -> None:
        """Gather the next chunk ahead, while the device computes, if the current one is used up."""
        if not self._chunk:
            self._draw_chunk()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, y and position_ids (B, T) each, on the device."""
        self.prefetch()
        x, y, positions, _ = self._chunk.pop(0)
        self._used += 1
        return to_device(x, self.device), to_device(y, self.device), to_device(positions, self.device)

    def counted_targets(self, batches: int) -> torch.Tensor:
        """The targets the loss counts in the next `batches` batches (one optimizer step's), as a tensor on the
        device: copied asynchronously, so reading it waits for nothing."""
        self.prefetch()
        if len(self._chunk) < batches:
            raise ValueError(f"a step of {batches} batches runs past the chunk of {self.chunk_batches}")
        return to_device(torch.stack([batch[3] for batch in self._chunk[:batches]]).sum(), self.device)
