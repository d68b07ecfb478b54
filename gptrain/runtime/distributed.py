"""Data parallelism on torch.distributed, as torchrun launches it: the process group, DDP or FSDP2 wrapping,
gradient-sync control for accumulation, and the few collectives the loop needs.

A single process (no torchrun variables) gets a context of world size 1, and every helper is then a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from gptrain.errors import UserError

# How long a collective may wait for a peer before the process group gives up: a rank that died is then
# reported instead of hanging the others forever (torchrun also stops the survivors when one worker fails).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistContext:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for each worker process."""
    if "WORLD_SIZE" not in os.environ:
        return DistContext()
    try:
        return DistContext(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    except (KeyError, ValueError):
        raise UserError(
            "WORLD_SIZE is set but RANK or LOCAL_RANK is missing or not a number; launch with torchrun") from None


def process_device(ctx: DistContext, requested: torch.device) -> torch.device:
    """Each rank on its own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if not ctx.distributed:
        return requested
    if requested.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {ctx.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                            "lower --nproc_per_node")
        return torch.device("cuda", ctx.local_rank)
    if requested.type == "mps":
        raise UserError("torch.distributed does not run on MPS; use device: cpu or a CUDA machine")
    return requested


def check_parallel(ctx: DistContext, gradient_accumulation_steps: int, parallel: str, dtype: torch.dtype) -> None:
    """What a config asks of the processes torchrun started, checked before any of them does work."""
    if gradient_accumulation_steps % ctx.world_size:
        raise UserError(
            f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by the number of "
            f"processes ({ctx.world_size}): it counts micro-batches per step over all ranks; use a multiple of "
            f"{ctx.world_size}"
        )
    if ctx.distributed and parallel == "fsdp" and dtype == torch.float16:
        raise UserError("parallel: fsdp does not combine with float16 gradient scaling here; use dtype: bfloat16")


@contextlib.contextmanager
def process_group(ctx: DistContext, device: torch.device):
    """Join the process group for the duration; leave it on errors and interrupts too, but for a user error on a rank
    other than 0 (see below). A collective that fails because a peer's process is gone becomes PeerLost."""
    if not ctx.distributed:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    try:
        yield
        # Leave together: a rank that tears down its communication threads while a peer still talks to it can
        # abort at exit. (On an error there is no barrier: the peers may be gone.)
        dist.barrier()
    except BaseException as exc:
        if peer_lost(exc):
            dist.destroy_process_group()
            raise PeerLost(ctx, exc) from None
        if isinstance(exc, UserError) and not ctx.is_main:
            # An error that this rank may have met alone (a node that does not see out_dir's checkpoint, say). The
            # CLI waits before it reports it (rank 0 reports the errors every rank meets): leaving the group now
            # would end the collective the peers wait in, and a peer ending in a failure makes torchrun stop this
            # rank before it has said why. The group goes with the process.
            raise
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()


class PeerLost(UserError):
    """A collective failed because another process of the job is gone (it failed, or was stopped): that process's own
    output says why. One `error:` line and exit code 1 instead of the backend's traceback."""

    exit_code = 1

    def __init__(self, ctx: DistContext, exc: BaseException):
        super().__init__(f"another process of this job ended while rank {ctx.rank} waited for it "
                         f"({_first_line(exc)}); its own output, on its node, says why")


# How gloo reports a peer whose process ended while a collective waited on it (and NCCL's ncclRemoteError, whose
# wording is taken from NCCL, untested here: the project has no GPUs).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def peer_lost(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _PEER_GONE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split("] ", 1)[-1] if text.startswith("[") else text  # gloo's "[source.cc:553] " prefix
    return text.split(". ", 1)[0]


def wrap_model(model: nn.Module, parallel: str, ctx: DistContext, device: torch.device, dtype: torch.dtype,
               compile_blocks: bool = False):
    """DDP replicates the model; FSDP2 shards each transformer block, then the root (parameters, gradients
    and optimizer state alike). Returns the module to run steps through; `model` stays the unwrapped one
    (for FSDP2 it is sharded in place). compile_blocks: compile each block first (before it is sharded);
    otherwise the caller compiles the whole model, if at all (runtime.device.compiles_per_block decides)."""
    if compile_blocks:
        for block in model.transformer.h:
            block.compile()
    if not ctx.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Parameters compute in the run's dtype and gradients reduce in float32; this replaces autocast.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    # The root holds the embedding and (tied) head: kept gathered after the forward pass (torchtitan), as the
    # backward pass needs them at once, instead of gathering them a second time.
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    return model


def uses_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Reduce gradients across ranks only on the last micro-batch of a step: DDP's no_sync(), FSDP2's
    set_requires_gradient_sync(). (Syncing every micro-batch gives the same result, slower; build-nanogpt
    PR #30 is about getting this switch right.)"""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not enabled:
        with wrapped.no_sync():
            yield
        return
    if uses_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(enabled)
    yield


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A rank's own part of a (possibly sharded) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def state_dict_api(offload: bool = True):
    """torch.distributed.checkpoint's state-dict functions and the options for full (unsharded) state dicts,
    gathered onto rank 0's CPU when offload, so a checkpoint loads anywhere: in one process, at another world size,
    sharded or not; DDP's `module.` prefix never appears in them. Imported when first needed: the import takes
    ~0.5 s, which every command that saves no checkpoint (and every test subprocess) would pay at start."""
    from torch.distributed.checkpoint import state_dict

    return state_dict, state_dict.StateDictOptions(full_state_dict=True, cpu_offload=offload)


def full_model_state(model: nn.Module) -> dict:
    """The model's weights in full (a collective under FSDP2: every rank calls it)."""
    api, full = state_dict_api()
    return api.get_model_state_dict(model, options=full)


class OptimizerState:
    """The optimizer's state as a stateful part: gathered in full and keyed by parameter name, so it loads at any
    world size; on loading, each rank keeps its own shard (FSDP2) or the whole state (DDP, one process)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        api, full = state_dict_api()
        return api.get_optimizer_state_dict(self.model, self.optimizer, options=full)

    def load_state_dict(self, state: dict) -> None:
        api, full = state_dict_api(offload=False)
        api.set_optimizer_state_dict(self.model, self.optimizer, state, options=full)
