"""Random streams: every random number a run draws comes from streams derived from the one seed, and their
state is saved in checkpoints so a resumed run draws the same numbers.

Independent streams: the training batches, the fixed evaluation batches of each split, dropout, and the order
of each epoch's windows (data_order: epochs). Under torchrun rank 0 draws the streams a single process would, and
every other rank its own; the epoch order alone is the job's, the same on every rank.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from gptrain.runtime.distributed import DistContext, all_gather_objects

TRAIN_STREAM, EVAL_TRAIN_STREAM, EVAL_VAL_STREAM, DROPOUT_STREAM, EPOCH_ORDER_STREAM = 0, 1, 2, 3, 4


def stream_seed(seed: int, stream: int, rank: int = 0, *more: int) -> int:
    """Rank 0 draws the streams of a single process; every other rank its own, deterministic given the rank."""
    keys = [seed, stream] + ([rank, *more] if rank or more else [])
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global random-number state (Python, NumPy, torch CPU and CUDA)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate wants the nested tuples getstate gave, which a round trip may turn into lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class RankStreams:
    """This rank's random streams as one stateful part: the global generators and the training batch sampler.

    state_dict() is a collective (every rank calls it): it gathers every rank's states, so a checkpoint holds
    them all. load_state_dict() restores this rank's own, at the same world size; at another world size no
    saved stream belongs to this rank, and fresh deterministic ones start from the iteration (it says so), but
    for a sampler whose position is global (the epoch order), which continues where the job was.
    """

    def __init__(self, ctx: DistContext, device: torch.device, seed: int, sampler_factory):
        self.ctx, self.device = ctx, device
        self.seed = seed
        self.sampler_factory = sampler_factory  # (stream, *more) -> a BatchSampler of the train split
        self.sampler = sampler_factory(TRAIN_STREAM)

    def state_dict(self) -> dict:
        """rng and sampler are rank 0's (a single process's); ranks holds every rank's under torchrun."""
        ranks = all_gather_objects({"rng": rng_state(), "sampler": self.sampler.state_dict()})
        return {"world_size": self.ctx.world_size, "rng": ranks[0]["rng"], "sampler": ranks[0]["sampler"],
                "ranks": ranks if self.ctx.distributed else None}

    def load_state_dict(self, state: dict, iter_num: int) -> str:
        """Restore; returns a note for the resume message ("" when every stream continues exactly)."""
        saved_world = state.get("world_size", 1)
        if saved_world == self.ctx.world_size:
            mine = state["ranks"][self.ctx.rank] if self.ctx.distributed else state
            set_rng_state(mine["rng"])
            self.sampler.load_state_dict(mine["sampler"])
            return ""
        torch.manual_seed(stream_seed(self.seed, DROPOUT_STREAM, self.ctx.rank, iter_num))
        saved_by = f" (saved by {saved_world} process(es), now {self.ctx.world_size}"
        if self.sampler.position_is_global:
            self.sampler.load_state_dict(state["sampler"])  # rank 0's, the same as every rank's between steps
            return f"{saved_by}: the epoch order continues at the same window, dropout follows new streams)"
        self.sampler = self.sampler_factory(TRAIN_STREAM, iter_num)
        return f"{saved_by}: batches follow new streams)"

    def undo_point(self) -> tuple:
        """What a training step changes in the streams, to undo the step (cheaper than a full state_dict)."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return self.sampler.state_dict(), torch.get_rng_state(), cuda

    def undo(self, point: tuple) -> None:
        sampler_state, cpu_rng, cuda_rng = point
        self.sampler.load_state_dict(sampler_state)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)
