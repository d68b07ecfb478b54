"""The learning-rate schedule: linear warmup, cosine decay to min_lr, then constant."""

from __future__ import annotations

import math


def learning_rate(
    it: int, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int, decay: bool = True
) -> float:
    if not decay:
        return max_lr
    if it < warmup_iters:
        # Starts at max_lr / (warmup_iters + 1), not 0: a step at lr 0 would be wasted.
        return max_lr * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (decay_iters - warmup_iters)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)
