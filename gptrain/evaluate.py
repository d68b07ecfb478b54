"""The loss estimate at each evaluation: the mean over eval_iters batches of each split, in eval mode.

The batches come from fixed random streams (EVAL_TRAIN_STREAM, EVAL_VAL_STREAM), so every evaluation of a run sees
the same ones and two evaluations differ only because the model did. On a chat dataset the loss is the mean over
the tokens it counts (the assistant's), however they fall into batches, and held-out questions can be answered for
an exact-match rate (gptrain/exact_match.py). With DPO the loss and its figures (rewards, log-probabilities) are
means over the pairs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from gptrain.data.chat_batches import IGNORE
from gptrain.dpo import Dpo, figures_row
from gptrain.exact_match import Question, exact_match_rate
from gptrain.monitor.console import quiet_bar
from gptrain.runtime import distributed as dist_util
from gptrain.runtime.device import autocast
from gptrain.runtime.distributed import DistContext
from gptrain.runtime.rng import EVAL_TRAIN_STREAM, EVAL_VAL_STREAM
from gptrain.runtime.signals import Abandoned, GracefulInterrupt


class Evaluator:
    def __init__(self, model: torch.nn.Module, forward: Callable, make_sampler: Callable, ctx: DistContext,
                 eval_iters: int, autocast_dtype: torch.dtype, interrupt: GracefulInterrupt,
                 token_weighted: bool = False, questions: list[Question] = (), dpo: Dpo | None = None):
        """forward runs the batches (the compiled or wrapped model); model switches between eval and train mode;
        make_sampler(split, stream) gives a fresh sampler of a split. token_weighted: the mean is over counted
        tokens rather than batches (chat data). questions: held-out questions to score by exact match. dpo: the
        run's DPO objective, whose loss and figures are evaluated over pairs."""
        self.model, self.forward, self.make_sampler, self.ctx = model, forward, make_sampler, ctx
        self.eval_iters, self.autocast_dtype, self.interrupt = eval_iters, autocast_dtype, interrupt
        self.token_weighted, self.questions, self.dpo = token_weighted, questions, dpo
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float] | None:
        """{"train": loss, "val": loss} (with DPO also "train_rewards/chosen", "val_rewards/chosen", ...), or None
        when a signal came: a single process abandons the evaluation at once, between two operations; ranks finish
        it together (its all-reduce), then agree to stop."""
        abandonable = contextlib.nullcontext() if self.ctx.distributed else self.interrupt.abandonable()
        self.model.eval()
        try:
            with abandonable:
                results = {}
                for split, stream in (("train", EVAL_TRAIN_STREAM), ("val", EVAL_VAL_STREAM)):
                    if self.dpo is None:
                        results[split] = self.mean_loss(split, stream)
                    else:
                        results[split], figures = self.mean_pair_loss(split, stream)
                        results |= figures
                if self.questions:
                    with autocast(self.device, self.autocast_dtype):
                        results["exact_match"] = exact_match_rate(self.model, self.questions, self.device)
                return results
        except Abandoned:
            return None
        finally:
            self.model.train()

    def mean_loss(self, split: str, stream: int) -> float:
        """The ranks share the batches out; the mean is over all of them (or all their counted tokens)."""
        per_rank = math.ceil(self.eval_iters / self.ctx.world_size)
        batches = self.make_sampler(split, stream)
        total, weight = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for _ in quiet_bar(range(per_rank), desc=f"eval {split}"):
            self.interrupt.check()  # in case library code swallowed the signal's exception
            batch = batches.next_batch()  # (x, y), and each token's position in its conversation for chat data
            with autocast(self.device, self.autocast_dtype):
                _, loss = self.forward(*batch, loss_reduction="sum" if self.token_weighted else "mean")
            total += loss.float()
            weight += (batch[1] != IGNORE).sum() if self.token_weighted else 1
        total, weight = dist_util.all_reduce(torch.stack([total, weight.float()])).tolist()  # one collective
        return total / max(weight, 1.0)

    def mean_pair_loss(self, split: str, stream: int) -> tuple[float, dict[str, float]]:
        """DPO's mean loss over the pairs of eval_iters batches (shared out among the ranks), and the means of its
        figures, named "SPLIT_rewards/chosen" and so on."""
        per_rank = math.ceil(self.eval_iters / self.ctx.world_size)
        batches = self.make_sampler(split, stream)
        sums = None
        for _ in quiet_bar(range(per_rank), desc=f"eval {split}"):
            self.interrupt.check()
            with autocast(self.device, self.autocast_dtype):
                _, batch_sums = self.dpo.batch_loss(self.forward, batches.next_batch())
            sums = batch_sums if sums is None else sums + batch_sums
        sums = dist_util.all_reduce(sums)  # one collective
        return sums[1].item() / max(sums[0].item(), 1.0), figures_row(sums, prefix=f"{split}_")
