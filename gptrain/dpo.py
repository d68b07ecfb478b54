"""Direct Preference Optimization (Rafailov et al. 2023), as TRL's DPOTrainer computes it.

A sequence's log-probability is the sum, over the answer tokens the mask counts, of log p(token) (TRL's summed
log-probabilities over the completion). With the policy's and the reference's log-probabilities of a pair's chosen
and rejected sequences, the log-ratios are policy - reference, the rewards dpo_beta x the log-ratios, and the loss:
- sigmoid: -log sigmoid(chosen reward - rejected reward) (the DPO paper's, TRL's default);
- ipo: ((chosen log-ratio / its answer tokens - rejected log-ratio / its answer tokens) - 1 / (2 dpo_beta))^2 (IPO,
  Azar et al. 2023, per answer token as TRL normalises it).
A micro-batch's loss is the mean over its pairs.

The reference is the run's starting model, frozen:
- with LoRA, that model is the base under the adapters: a forward pass without gradients, adapters disabled,
  costs no second copy of the weights (TRL does the same with a peft model);
- otherwise its log-probabilities of every train and val pair are computed once, before the first step, and kept
  in the run's checkpoints (StoredReference): one forward pass per pair instead of one per pair per step, no
  frozen copy of the weights in memory, and a resumed run reads exactly the numbers it trained against.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from gptrain.data.chat_batches import IGNORE
from gptrain.data.preference_batches import PairBatch, PreferenceSplit
from gptrain.errors import UserError
from gptrain.lora import adapters_disabled
from gptrain.runtime import distributed as dist_util
from gptrain.runtime.device import autocast

# TRL's names for the figures logged per step and at evaluation, each a mean over the pairs.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
REFERENCE_KEY = "dpo_reference"  # the checkpoint's entry for the stored reference log-probabilities


def sequence_logps(forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(2B,) float32: each row's summed log-probability of its counted targets (y != IGNORE)."""
    _, token_losses = forward(x, y, loss_reduction="none")  # cross-entropy per target, 0 where ignored
    return -token_losses.view(x.shape).sum(dim=1)


def pair_losses(logps: torch.Tensor, reference: torch.Tensor, counted: torch.Tensor, beta: float,
                kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the figures summed over the pairs: [pairs, loss, *METRICS].
    logps, reference: (B, 2) log-probabilities of (chosen, rejected); counted: (B, 2) their answer tokens."""
    logratios = logps - reference
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (logratios[:, 0] - logratios[:, 1]))
    elif kind == "ipo":
        per_token = logratios / counted.clamp(min=1)
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}")
    rewards = beta * logratios.detach()
    chosen, rejected = rewards.unbind(1)
    figures = torch.stack([chosen, rejected, (chosen > rejected).float(), chosen - rejected,
                           *logps.detach().unbind(1)])  # (len(METRICS), B)
    pairs = torch.tensor([float(len(losses))], device=losses.device)
    return losses, torch.cat([pairs, losses.detach().sum().unsqueeze(0), figures.sum(dim=1)])


def figures_row(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Summed figures ([pairs, loss, *METRICS], over ranks too) -> each metric's mean over the pairs."""
    values = sums.tolist()
    pairs = max(values[0], 1.0)
    return {f"{prefix}{name}": value / pairs for name, value in zip(METRICS, values[2:])}


def as_pairs(rows: torch.Tensor) -> torch.Tensor:
    """(2B,) rows, chosen first -> (B, 2) columns (chosen, rejected)."""
    return torch.stack(rows.chunk(2), dim=1)


class Dpo:
    """The DPO objective of a run: the loss of a batch of pairs against the reference, and its figures."""

    def __init__(self, model: torch.nn.Module, beta: float, kind: str, stored: dict[str, torch.Tensor] | None):
        """stored: the reference log-probabilities by split ((pairs, 2) each); None: the model with its adapters
        disabled is the reference (LoRA)."""
        self.model, self.beta, self.kind, self.stored = model, beta, kind, stored

    def reference_logps(self, batch: PairBatch) -> torch.Tensor:
        """(B, 2): the reference's log-probabilities of the batch's pairs."""
        if self.stored is not None:
            return self.stored[batch.split][batch.pairs].to(batch.x.device)
        with torch.no_grad(), adapters_disabled(self.model), evaluating(self.model):
            return as_pairs(sequence_logps(self.model, batch.x, batch.y))

    def batch_loss(self, forward, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss over the batch's pairs (forward: the model as the step runs it), and its summed figures.
        The reference goes first: with LoRA its forward pass must not come between the policy's and its backward
        pass, which DDP reduces."""
        reference = self.reference_logps(batch)
        logps = as_pairs(sequence_logps(forward, batch.x, batch.y))
        counted = as_pairs((batch.y != IGNORE).sum(dim=1))
        losses, sums = pair_losses(logps, reference, counted, self.beta, self.kind)
        return losses.mean(), sums

    def checkpoint_entry(self) -> dict:
        return {REFERENCE_KEY: self.stored} if self.stored is not None else {}


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode (no dropout) for a while: the reference is the starting model as it predicts, not as it trains."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def split_reference(model: torch.nn.Module, split: PreferenceSplit, batch_size: int, device: torch.device,
                    dtype: torch.dtype, rank: int, world_size: int) -> torch.Tensor:
    """(pairs, 2) the model's log-probabilities of a split's pairs (chosen, rejected), computed in the run's
    autocast dtype: each rank computes every world_size-th batch, and one all-reduce gives every rank all."""
    table = torch.zeros(split.pairs, 2, device=device)
    batches = torch.arange(split.pairs).split(batch_size)
    with evaluating(model), autocast(device, dtype):
        for pairs in batches[rank::world_size]:
            batch = split.batch(pairs.numpy(), device)
            table[pairs.to(device)] = as_pairs(sequence_logps(model, batch.x, batch.y)).float()
    return dist_util.all_reduce(table).cpu()


def stored_reference(model: torch.nn.Module, splits: dict[str, PreferenceSplit], batch_size: int,
                     device: torch.device, dtype: torch.dtype, ctx, resume: dict | None) -> dict[str, torch.Tensor]:
    """The reference log-probabilities of every pair: a resumed run's own (checked against the dataset), or the
    starting model's, computed now (before the model is wrapped, so no collective runs inside its forward)."""
    if resume is not None:
        return checked_reference(resume.get(REFERENCE_KEY), splits)
    started = time.perf_counter()
    stored = {name: split_reference(model, split, batch_size, device, dtype, ctx.rank, ctx.world_size)
              for name, split in splits.items()}
    if ctx.is_main:
        print(f"reference log-probabilities of the starting model: {splits['train'].pairs:,} train and "
              f"{splits['val'].pairs:,} val pairs in {time.perf_counter() - started:.1f}s (kept in the checkpoints)")
    return stored


def checked_reference(saved, splits: dict[str, PreferenceSplit]) -> dict[str, torch.Tensor]:
    """A checkpoint's reference log-probabilities, which must cover the dataset's pairs."""
    if not isinstance(saved, dict) or set(saved) != set(splits) or not all(
            isinstance(t, torch.Tensor) and t.shape == (splits[name].pairs, 2) for name, t in saved.items()):
        counts = ", ".join(f"{split.pairs} {name}" for name, split in splits.items())
        raise UserError(f"the checkpoint holds no reference log-probabilities for this dataset's pairs ({counts}); "
                        "a DPO run resumes on the preference dataset it started on (or start a new run from its "
                        "weights with init_from: from:PATH)")
    return {name: table.float() for name, table in saved.items()}
