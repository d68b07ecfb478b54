"""Learning-rate schedules: linear warmup, then cosine, linear or warmup-stable-decay down to min_lr."""

from __future__ import annotations

import math


def learning_rate(
    it: int,
    max_lr: float,
    min_lr: float,
    warmup_iters: int,
    decay_iters: int,
    decay: bool = True,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """cosine: nanoGPT's half cosine from the end of warmup to decay_iters. linear: a straight line over the
    same span. wsd (warmup-stable-decay, Hu et al. 2024, MiniCPM): flat at max_lr, then a straight line down over
    the last decay_fraction of the iterations up to decay_iters. min_lr from decay_iters on."""
    if not decay:
        return max_lr
    if it < warmup_iters:
        # Starts at max_lr / (warmup_iters + 1), not 0: a step at lr 0 would be wasted.
        return max_lr * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    if schedule == "wsd":
        decay_start = max(warmup_iters, decay_iters - round(decay_fraction * decay_iters))
        if it < decay_start:
            return max_lr
        return max_lr - (max_lr - min_lr) * (it - decay_start) / (decay_iters - decay_start)
    progress = (it - warmup_iters) / (decay_iters - warmup_iters)  # 0 -> 1
    if schedule == "linear":
        return max_lr - (max_lr - min_lr) * progress
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)
