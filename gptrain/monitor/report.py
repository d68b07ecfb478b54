"""What a run tells as it goes: the console, metrics.jsonl (and the trackers it feeds), and the health monitor.

The Trainer decides when to log, evaluate and stop; RunReport turns each of those moments into the printed line,
the metrics row and the health checks, so that the loop reads as training and not as bookkeeping.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from gptrain.config import TrainConfig
from gptrain.dpo import METRICS as DPO_METRICS
from gptrain.dpo import figures_row
from gptrain.loop_state import LoopState
from gptrain.monitor.console import Console
from gptrain.monitor.cpu_load import CpuLoad
from gptrain.monitor.health import HealthMonitor, RateLimiter
from gptrain.monitor.metrics import MetricsLog, NullMetrics, finite_or_none
from gptrain.monitor.run_info import RunInfo
from gptrain.runtime import distributed as dist_util
from gptrain.runtime.distributed import DistContext


class RunReport:
    def __init__(self, config: TrainConfig, info: RunInfo, ctx: DistContext, model: torch.nn.Module,
                 resume_advice: Callable[[], str]):
        """Quiet and writing nowhere until open(): a Trainer that is built but never run (bench, explain, the
        tests) reports nothing."""
        self.config, self.info, self.ctx = config, info, ctx
        self.metrics: MetricsLog | NullMetrics = NullMetrics()
        self.console = Console(quiet=True)
        self.load: CpuLoad | None = None
        self.limiter = RateLimiter(config.eval_interval)
        self.health = HealthMonitor.for_run(config, model, self.warn, info.dtype_name, resume_advice)

    def open(self, metrics: MetricsLog | None, start_iter: int) -> None:
        """Start reporting: rank 0 prints and writes metrics (when given); the other ranks stay quiet."""
        if metrics is not None:
            self.metrics = metrics
        self.console = Console(start_iter, self.config.max_iters, quiet=not self.ctx.is_main,
                               eval_interval=self.config.eval_interval)
        # Torchrun's other ranks would count as other work: the machine's load is measured in one process only.
        self.load = CpuLoad() if not self.ctx.distributed else None

    def start(self, it: int) -> None:
        """The run's first words: the summary line, the start row, and what the config will not do as hoped."""
        self.console.message(self.info.summary())
        self.metrics.write(self.info.start_row(it))
        self.check_eval_schedule(it)

    def check_eval_schedule(self, it: int) -> None:
        """An eval_interval beyond max_iters never comes: only the first and the final evaluations run. (max_iters 0
        is the way to save and evaluate the initial model, and eval_only evaluates once: both as meant.)"""
        cfg = self.config
        if cfg.eval_only or cfg.max_iters == 0 or cfg.eval_interval <= cfg.max_iters:
            return
        self.warn(it, "few_evals", f"eval_interval ({cfg.eval_interval}) is more than max_iters ({cfg.max_iters}): "
                                   f"the run evaluates only at iter 0 and at its end (iter {cfg.max_iters}), so val "
                                   "loss, ckpt_best.pt and early stopping see nothing in between; lower eval_interval "
                                   f"(e.g. to {max(1, cfg.max_iters // 10)}) to evaluate during the run")

    def step(self, it: int, lr: float, result, seconds_per_iter: float, epoch: int | None = None,
             positions_per_iter: float | None = None) -> None:
        """A logged step: read the step's figures (the one synchronisation), record, check health, print.
        positions_per_iter: this rank's mean since the last log where steps differ in size (DPO's padded pairs);
        otherwise every step reads the config's tokens_per_iter."""
        cfg = self.config
        self.health.read_bad_steps(it)
        loss, tokens_per_iter = self.summed_over_ranks(result.loss, positions_per_iter)
        grad_norm = result.grad_norm.item()
        row = {"iter": it, "loss": finite_or_none(loss), "lr": lr, "grad_norm": finite_or_none(grad_norm),
               "clipped": cfg.grad_clip > 0 and grad_norm > cfg.grad_clip,
               "ms": seconds_per_iter * 1000, "tokens_per_s": tokens_per_iter / seconds_per_iter}
        if result.update_ratio is not None:
            row["update_ratio"] = finite_or_none(result.update_ratio.item())
        if result.pair_sums is not None:  # DPO's rewards and log-probabilities, over the step's pairs on every rank
            row.update({k: finite_or_none(v) for k, v in figures_row(dist_util.all_reduce(result.pair_sums)).items()})
        if epoch is not None:
            row["epoch"] = epoch
        busy = self.load.since_last() if self.load is not None else None
        if busy is not None:
            row["busy"] = round(busy, 3)  # the share of the machine other processes used since the last such figure
        mfu = self.info.mfu(row["tokens_per_s"])
        if mfu is not None:
            row["mfu"] = mfu
        self.metrics.write(row)
        self.health.check_logged_step(it, row["grad_norm"], row.get("update_ratio"), warmup=it < cfg.warmup_iters)
        self.console.step_logged(row, loss)

    def summed_over_ranks(self, loss: torch.Tensor, positions_per_iter: float | None) -> tuple[float, float]:
        """The step's mean loss over the ranks, and its tokens per iteration on all of them: the config's, or the
        positions the ranks' padded batches held (padding included, as the model computes it)."""
        if positions_per_iter is None:
            return dist_util.all_reduce(loss.clone()).item() / self.ctx.world_size, self.config.tokens_per_iter
        figures = torch.stack([loss.detach().float(), torch.tensor(positions_per_iter, device=loss.device)])
        loss_sum, positions = dist_util.all_reduce(figures).tolist()
        return loss_sum / self.ctx.world_size, positions

    def evaluation(self, it: int, losses: dict) -> None:
        """An evaluation's losses (and exact-match rate on chat data): printed, recorded, checked for overfitting."""
        answered = f", exact match {losses['exact_match']:.1%}" if "exact_match" in losses else ""
        preferred = (f", val reward margin {losses['val_rewards/margins']:.3f}, accuracy "
                     f"{losses['val_rewards/accuracies']:.1%}") if "val_rewards/margins" in losses else ""
        self.console.message(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{preferred}"
                             f"{answered}")
        row = {"iter": it, "train_loss": finite_or_none(losses["train"]), "val_loss": finite_or_none(losses["val"])}
        row |= {f"{split}_{name}": finite_or_none(losses[f"{split}_{name}"]) for split in ("train", "val")
                for name in DPO_METRICS if f"{split}_{name}" in losses}
        if "exact_match" in losses:
            row["val_exact_match"] = losses["exact_match"]
        self.metrics.write(row)
        self.health.check_eval(it, losses["train"], losses["val"])

    def warn(self, it: int, kind: str, message: str) -> None:
        """A warning (of the health monitor, or about the config): to stderr and metrics.jsonl, at most one of each
        kind per eval interval."""
        if self.limiter.allow(it, kind):
            self.console.message(f"warning: {message}", file=sys.stderr)
            self.metrics.write({"iter": it, "event": kind, "message": message})

    def early_stop(self, it: int, loop: LoopState, reason: str) -> None:
        self.console.message(f"early stop at iter {it}: {reason}")
        self.metrics.write({"iter": it, "event": "early_stop", "message": reason,
                            "best_val_loss": finite_or_none(loop.best_val_loss), "best_iter": loop.best_iter,
                            "evals_without_improvement": loop.evals_since_best})
