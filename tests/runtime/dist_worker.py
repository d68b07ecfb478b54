"""A training process for the distributed tests: run by torchrun (2 ranks) or plainly (1 process).

    python dist_worker.py RUNS_JSON [--crash-rank R]

RUNS_JSON holds a list of runs, each {"steps", "config", "out"}; they share one process group, so one launch
(the costly part: torchrun and every rank importing torch) serves several comparisons. Each run trains `steps`
optimizer steps on fixed micro-batches (the same global set whatever the world size: rank r takes its share in
order; random tokens, a chat dataset's batches or a preference dataset's pairs), counts gradient reductions and the
micro-batch each happened in, and writes the full initial and final weights (rank 0) to its `out` folder.
"""

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from gptrain.build import place
from gptrain.config import build_config
from gptrain.data.chat_batches import ChatBatchSampler
from gptrain.data.preference_batches import PreferenceBatchSampler
from gptrain.runtime import distributed as dist_util
from gptrain.runtime.distributed import full_model_state
from gptrain.train import Trainer


class FixedBatches:
    """Stands in for the random sampler: step s, micro-batch m of rank r gets global batch r * M + m."""

    def __init__(self, batches, rank, accumulation_steps):
        self.batches, self.rank, self.accumulation_steps = batches, rank, accumulation_steps
        self.step, self.micro = 0, 0

    def next_batch(self):
        batch = self.batches[self.step][self.rank * self.accumulation_steps + self.micro]
        self.micro += 1
        if self.micro == self.accumulation_steps:
            self.step, self.micro = self.step + 1, 0
        return batch

    def prefetch(self):
        pass

    def counted_targets(self, batches: int) -> torch.Tensor:
        """As ChatBatchSampler's: the targets the loss counts in this rank's next `batches` micro-batches."""
        first = self.rank * self.accumulation_steps + self.micro
        return sum((batch[1] != -1).sum() for batch in self.batches[self.step][first:first + batches])

    def state_dict(self):  # the loop takes one before each accumulated step, to undo it on a signal
        return {"step": self.step, "micro": self.micro}

    def load_state_dict(self, state):
        self.step, self.micro = state["step"], state["micro"]


@contextmanager
def counting_reductions(trainer, events):
    """Record (step, micro-batch) for each gradient reduction the wrapper performs, while the block runs."""
    where = lambda: (trainer.train_batches.step, trainer.train_batches.micro)  # noqa: E731
    if isinstance(trainer.wrapped, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            events.append(where())
            return allreduce_hook(state, bucket)

        trainer.wrapped.register_comm_hook(None, hook)
    original = dist.reduce_scatter_single
    if trainer.sharded:
        def counting(*args, **kwargs):
            events.append(where())
            return original(*args, **kwargs)

        dist.reduce_scatter_single = counting
    try:
        yield
    finally:
        dist.reduce_scatter_single = original  # the next run in this process counts only its own


def chat_batches(trainer, steps):
    """The same (input, target, position) micro-batches on every rank, drawn from the chat dataset in order."""
    sampler = ChatBatchSampler(trainer.dataset.chat["train"], trainer.config.batch_size, trainer.config.block_size,
                               0, torch.device("cpu"))
    return [[sampler.next_batch() for _ in range(trainer.config.gradient_accumulation_steps)] for _ in range(steps)]


def pair_batches(trainer, steps):
    """The same DPO micro-batches of pairs on every rank, drawn from the preference dataset in order."""
    sampler = PreferenceBatchSampler(trainer.dataset.preference["train"], trainer.config.batch_size, 0,
                                     torch.device("cpu"))
    return [[sampler.next_batch() for _ in range(trainer.config.gradient_accumulation_steps)] for _ in range(steps)]


def random_batches(config, vocab_size, steps):
    """The same (input, target) micro-batches on every rank: all of a step's, for the whole world."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        rows = [torch.randint(0, vocab_size, (config.batch_size, config.block_size + 1), generator=generator)
                for _ in range(config.gradient_accumulation_steps)]
        batches.append([(r[:, :-1], r[:, 1:]) for r in rows])
    return batches


def train_one(run, ctx, crash_rank):
    config, out = build_config(run["config"]), Path(run["out"])
    trainer = Trainer(config, placement=place(config, ctx))
    initial = full_model_state(trainer.model)  # a collective: every rank calls it
    if ctx.is_main:
        torch.save(initial, out / "initial.pt")
    if trainer.dpo is not None:
        batches = pair_batches(trainer, run["steps"])
    elif trainer.dataset.chat:
        batches = chat_batches(trainer, run["steps"])
    else:
        batches = random_batches(config, trainer.model.config.vocab_size, run["steps"])
    trainer.train_batches = FixedBatches(batches, ctx.rank, trainer.accumulation_steps)
    events = []
    with counting_reductions(trainer, events):
        for it in range(run["steps"]):
            if it == 2 and ctx.rank == crash_rank:
                raise RuntimeError(f"rank {ctx.rank} fails on purpose at step {it}")
            trainer.set_lr(it)
            trainer.train_step()
    weights = full_model_state(trainer.model)
    if ctx.is_main:
        torch.save(weights, out / "weights.pt")
        reductions = {"events": events, "accumulation_steps": trainer.accumulation_steps}
        (out / "reductions.json").write_text(json.dumps(reductions))
    trainer.release()  # before the process group goes, as gptrain's own train() does


def main():
    runs = json.loads(Path(sys.argv[1]).read_text())
    crash_rank = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--crash-rank" else None
    ctx = dist_util.context_from_env()
    with dist_util.process_group(ctx, torch.device("cpu")):
        for run in runs:
            train_one(run, ctx, crash_rank)


if __name__ == "__main__":
    main()
