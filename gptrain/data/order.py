"""data_order: epochs. Each epoch walks every window of the train split once, in an order shuffled anew each
epoch (without replacement); `random` (data/dataset.py's BatchSampler) draws each window anywhere, with
replacement, as nanoGPT does.

A window is block_size + 1 tokens that start at a multiple of block_size: x is its first block_size tokens, y the
same shifted by one. The windows tile the split, neighbours sharing only the token where one ends and the next
begins, so every token is a target exactly once per epoch (but the first, and the fewer than block_size left over
at the end): an epoch is one pass over the data. Windows at every offset would make an epoch block_size times
longer, and made of near-copies.

The order is global, the same at every world size. Epoch 0's windows in their shuffled order, then epoch 1's, and
so on, form one stream, and the position in it counts the windows the whole job has consumed. Each optimizer step
consumes gradient_accumulation_steps * batch_size windows: micro-batch g of the step is the next batch_size
windows after g * batch_size, and rank r takes micro-batches r * M to r * M + M - 1 (M = gradient_accumulation_steps
/ world_size), the ones a single process would take in that place. So a step sees the same windows on one process
or eight, and a checkpoint's position (the same on every rank between steps) resumes at the same window on any
world size, and with another batch size too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gptrain.data.dataset import TokenFile, check_enough_tokens, inputs_and_targets
from gptrain.errors import UserError
from gptrain.runtime.rng import EPOCH_ORDER_STREAM, stream_seed


@dataclass(frozen=True)
class RankShare:
    """This rank's part of each step: accumulation_steps micro-batches, after those of the ranks before it."""

    rank: int = 0
    world_size: int = 1
    accumulation_steps: int = 1  # this rank's share of gradient_accumulation_steps: that over world_size

    @property
    def gradient_accumulation_steps(self) -> int:
        """The micro-batches of one step across the job (the config key's value)."""
        return self.world_size * self.accumulation_steps


class EpochSampler:
    """Batches of windows in the global epoch order; the same interface as BatchSampler.

    Its state is the stream position as (epoch, position in the epoch): exact between steps on every rank, and at
    every micro-batch in a single process (where a step's undo point is taken). A batch is gathered ahead by
    prefetch(), but is a function of the position alone, so the state never needs to know about it.
    """

    position_is_global = True  # a checkpoint's position is the job's, valid at any world size

    def __init__(self, tokens: TokenFile, batch_size: int, block_size: int, seed: int, device: torch.device,
                 share: RankShare = RankShare()):
        check_enough_tokens(tokens, block_size)
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.seed, self.device, self.share = seed, device, share
        self.windows = (tokens.num_tokens - 1) // block_size  # window i is tokens[i * T : i * T + T + 1]
        check_a_step_fits_an_epoch(tokens, self.windows, batch_size, block_size, share.gradient_accumulation_steps)
        self.step_start = 0  # the stream position where the current step's windows begin
        self.micro = 0  # micro-batches this rank has taken in the current step
        self._orders: dict[int, np.ndarray] = {}  # epoch -> its shuffled window indices (at most two epochs)
        self._next: torch.Tensor | None = None  # the next batch, gathered ahead: (B, T + 1)

    @property
    def position(self) -> int:
        """Windows the job has consumed before this rank's next micro-batch (in a single process: all of them)."""
        return self.step_start + self.micro * self.batch_size

    @property
    def epochs_done(self) -> float:
        """Epochs walked so far, with the fraction of the current one: 1.25 is a quarter into the second."""
        return self.position / self.windows

    def prefetch(self) -> None:
        """Gather the next batch ahead, while the device computes."""
        if self._next is None:
            first = self.step_start + (self.share.rank * self.share.accumulation_steps + self.micro) * self.batch_size
            self._next = self._gather(first)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.prefetch()
        rows, self._next = self._next, None
        self.micro += 1
        if self.micro == self.share.accumulation_steps:  # every rank has finished the step: move past all its windows
            self.step_start += self.share.gradient_accumulation_steps * self.batch_size
            self.micro = 0
        return inputs_and_targets(rows, self.device)

    def _gather(self, first: int) -> torch.Tensor:
        """The windows at stream positions first .. first + B - 1 (the last epoch's end and the next's start, when
        the batch straddles them), as (B, T + 1)."""
        epochs, offsets = np.divmod(np.arange(first, first + self.batch_size), self.windows)
        starts = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            starts[here] = self._order(int(epoch))[offsets[here]] * self.block_size
        ids = self.tokens.gather(starts, self.block_size + 1)  # (B, T + 1)
        return torch.from_numpy(ids)

    def _order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s permutation of the windows, seeded by the run's seed and the epoch alone (never by the
        rank), so every rank, and every resume, computes the same one."""
        if epoch not in self._orders:
            rng = np.random.Generator(np.random.PCG64(stream_seed(self.seed, EPOCH_ORDER_STREAM, 0, epoch)))
            self._orders = {e: order for e, order in self._orders.items() if abs(e - epoch) == 1}
            self._orders[epoch] = rng.permutation(self.windows)
        return self._orders[epoch]

    def state_dict(self) -> dict:
        epoch, position = divmod(self.position, self.windows)
        return {"epoch": epoch, "position": position, "windows": self.windows}

    def load_state_dict(self, state: dict) -> None:
        """A split with another number of windows (prepared again) cannot go on in the old epoch's order: the next
        epoch starts, over the new windows."""
        epoch, position, windows = state["epoch"], state["position"], state["windows"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, position, windows)):
            raise TypeError(f"sampler state {state!r} is not three integers")
        if not (epoch >= 0 and 0 <= position < windows):
            raise ValueError(f"sampler state {state!r} is out of range")
        if windows != self.windows:
            epoch, position = epoch + 1, 0
        self.step_start, self.micro, self._next = epoch * self.windows + position, 0, None


def check_a_step_fits_an_epoch(tokens: TokenFile, windows: int, batch_size: int, block_size: int,
                               gradient_accumulation_steps: int) -> None:
    """An epoch shorter than one optimizer step would repeat windows within the step."""
    step_windows = gradient_accumulation_steps * batch_size
    if windows < step_windows:
        raise UserError(
            f"data_order: epochs: {tokens.path} holds {windows} windows of block_size {block_size}, fewer than the "
            f"{step_windows} of one optimizer step (batch_size {batch_size} x gradient_accumulation_steps "
            f"{gradient_accumulation_steps}); lower batch_size, gradient_accumulation_steps or block_size, prepare "
            "more text, or use data_order: random")
