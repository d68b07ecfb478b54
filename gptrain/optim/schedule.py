"""The learning-rate schedule: linear warmup, then cosine, linear or warmup-stable-decay down to the floor.

It is a multiplier of each parameter group's base rate, 1 at the peak: learning_rate's groups then follow
learning_rate -> min_lr, and Muon's matrices (whose base rate is muon_lr) follow the same curve."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Phase = Literal["constant", "warmup", "stable", "decay", "floor"]


@dataclass(frozen=True)
class LrSchedule:
    """cosine: nanoGPT's half cosine from the end of warmup to decay_iters. linear: a straight line over the same
    span. wsd (warmup-stable-decay, Hu et al. 2024, MiniCPM): flat at the peak, then a straight line down over the
    last decay_fraction of the iterations up to decay_iters. The floor (min_ratio = min_lr / learning_rate) from
    decay_iters on."""

    warmup_iters: int
    decay_iters: int
    min_ratio: float
    shape: str = "cosine"  # cosine, linear or wsd
    decay_fraction: float = 0.2
    decay: bool = True  # false: the peak throughout

    @property
    def decay_start(self) -> int:
        """Where the rate starts to fall: the end of warmup, or for wsd the start of its last decay_fraction."""
        if self.shape == "wsd":
            return max(self.warmup_iters, self.decay_iters - round(self.decay_fraction * self.decay_iters))
        return self.warmup_iters

    def phase(self, it: int) -> Phase:
        if not self.decay:
            return "constant"
        if it < self.warmup_iters:
            return "warmup"
        if it >= self.decay_iters:
            return "floor"
        return "stable" if it < self.decay_start else "decay"

    def factor(self, it: int) -> float:
        """The multiplier of the base rates at iteration `it`."""
        phase = self.phase(it)
        if phase in ("constant", "stable"):
            return 1.0
        if phase == "warmup":  # starts at 1 / (warmup_iters + 1), not 0: a step at rate 0 would be wasted
            return 1.0 * (it + 1) / (self.warmup_iters + 1)
        if phase == "floor":
            return self.min_ratio
        start, end = self.decay_start, self.decay_iters
        if self.shape == "wsd":
            return 1.0 - (1.0 - self.min_ratio) * (it - start) / (end - start)
        progress = (it - start) / (end - start)  # 0 -> 1
        if self.shape == "linear":
            return 1.0 - (1.0 - self.min_ratio) * progress
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
        return self.min_ratio + coeff * (1.0 - self.min_ratio)
