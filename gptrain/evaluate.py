"""The loss estimate at each evaluation: the mean over eval_iters batches of each split, in eval mode.

The batches come from fixed random streams (EVAL_TRAIN_STREAM, EVAL_VAL_STREAM), so every evaluation of a run sees
the same ones and two evaluations differ only because the model did.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from gptrain.monitor.console import quiet_bar
from gptrain.runtime import distributed as dist_util
from gptrain.runtime.device import autocast
from gptrain.runtime.distributed import DistContext
from gptrain.runtime.rng import EVAL_TRAIN_STREAM, EVAL_VAL_STREAM
from gptrain.runtime.signals import Abandoned, GracefulInterrupt


class Evaluator:
    def __init__(self, model: torch.nn.Module, forward: Callable, make_sampler: Callable, ctx: DistContext,
                 eval_iters: int, autocast_dtype: torch.dtype, interrupt: GracefulInterrupt):
        """forward runs the batches (the compiled or wrapped model); model switches between eval and train mode;
        make_sampler(split, stream) gives a fresh sampler of a split."""
        self.model, self.forward, self.make_sampler, self.ctx = model, forward, make_sampler, ctx
        self.eval_iters, self.autocast_dtype, self.interrupt = eval_iters, autocast_dtype, interrupt
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float] | None:
        """{"train": loss, "val": loss}, or None when a signal came: a single process abandons the evaluation at
        once, between two operations; ranks finish it together (its all-reduce), then agree to stop."""
        abandonable = contextlib.nullcontext() if self.ctx.distributed else self.interrupt.abandonable()
        self.model.eval()
        try:
            with abandonable:
                return {split: self.mean_loss(split, stream)
                        for split, stream in (("train", EVAL_TRAIN_STREAM), ("val", EVAL_VAL_STREAM))}
        except Abandoned:
            return None
        finally:
            self.model.train()

    def mean_loss(self, split: str, stream: int) -> float:
        """The ranks share the batches out; the mean is over all of them."""
        per_rank = math.ceil(self.eval_iters / self.ctx.world_size)
        batches = self.make_sampler(split, stream)
        total = torch.zeros((), device=self.device)
        for _ in quiet_bar(range(per_rank), desc=f"eval {split}"):
            self.interrupt.check()  # in case library code swallowed the signal's exception
            x, y = batches.next_batch()
            with autocast(self.device, self.autocast_dtype):
                _, loss = self.forward(x, y)
            total += loss.float()
        return dist_util.all_reduce(total).item() / (per_rank * self.ctx.world_size)
