"""Muon (Keller Jordan 2024): momentum SGD whose update for each 2-D hidden weight matrix is orthogonalised by a
Newton-Schulz iteration, so every direction of the matrix moves by about the same amount. Embeddings, the LM head
and 1-D parameters keep AdamW (torch's own implementation, called functionally), each group with its own
learning rate, in one optimizer object so checkpoints, resume and the training loop see a single optimizer.

Over several ranks each matrix is orthogonalised on one rank only (modded-nanogpt's split; `owners` assigns
them, balancing the work) and the results are exchanged, so every rank applies the update one process would:
- DDP: every rank holds the full (already averaged) update; each orthogonalises its own matrices, and one
  all-gather hands every rank all the results.
- FSDP2: each rank holds rows of every matrix; one all-to-all sends each matrix's rows to its owner, which
  orthogonalises the full matrix, and a second sends each rank its rows of the result. A rank receives about
  1/world_size of the matrices where gathering every full matrix on every rank received them all.
The exchanges carry the orthogonalisation's own precision (ns_dtype): the numbers are those of one process.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

# Keller Jordan's quintic coefficients: they push every singular value into about [0.7, 1.2] in 5 steps, which is
# as good as exactly 1 for an update direction, and much cheaper than iterating to convergence.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T for each matrix g = U S V^T of a (..., rows, cols) stack (the nearest semi-orthogonal
    matrix), by a quintic Newton-Schulz iteration X <- a X + (b A + c A^2) X with A = X X^T, computed in `dtype`."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT  # iterate on the wide orientation: A is the smaller Gram matrix
    # The spectral norm is at most the Frobenius norm: every singular value now <= 1.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT  # (..., rows, rows)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) if x.dim() == 3 else b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a) if x.dim() == 3 else a * x + poly @ x
    return (x.mT if transposed else x).to(g.dtype)


def orthogonalise_stacks(matrices: list[torch.Tensor], steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each full matrix orthogonalised, in `dtype`. Matrices of one shape up to transposition are iterated as one
    batch: a block's (4C, C) and (C, 4C) weights together, in their wide orientation."""
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(tuple(sorted(m.shape)), []).append(i)
    result: list[torch.Tensor] = [None] * len(matrices)
    for indices in by_shape.values():
        tall = [matrices[i].size(-2) > matrices[i].size(-1) for i in indices]
        wide = torch.stack([matrices[i].to(dtype).mT if t else matrices[i].to(dtype) for i, t in zip(indices, tall)])
        for i, t, r in zip(indices, tall, newton_schulz(wide, steps, dtype).unbind(0)):
            result[i] = r.mT if t else r
    return result


def _cost(shape: tuple[int, ...]) -> int:
    """A Newton-Schulz iteration's work on a matrix: its matmuls take rows * cols * min(rows, cols) multiply-adds."""
    return math.prod(shape) * min(shape[-2:])


@functools.lru_cache(maxsize=64)
def owners(shapes: tuple[tuple[int, ...], ...], world_size: int) -> tuple[int, ...]:
    """The rank that orthogonalises each matrix of a group: the costliest first, each to the rank with the least
    work so far (ties to the lowest rank). Matrices of one shape go round the ranks, and a count that does not
    divide by the world size leaves the next shape's first matrices to the ranks that got fewer. Every rank
    computes the same plan from the shapes alone."""
    load, owner = [0] * world_size, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: -_cost(shapes[i])):  # stable: equal costs in order
        rank = min(range(world_size), key=load.__getitem__)
        owner[i], load[rank] = rank, load[rank] + _cost(shapes[i])
    return tuple(owner)


def _plan(updates: list[torch.Tensor], world_size: int) -> list[list[int]]:
    """For each rank, the indices of the matrices it orthogonalises."""
    owner = owners(tuple(tuple(u.shape) for u in updates), world_size)
    return [[i for i, o in enumerate(owner) if o == rank] for rank in range(world_size)]


def orthogonalise_replicated(updates: list[torch.Tensor], steps: int, dtype: torch.dtype,
                             group=None) -> list[torch.Tensor]:
    """DDP: every rank holds every full update. Each orthogonalises the matrices `owners` gives it, and one
    all-gather (of each rank's results, flattened and padded to the longest rank's) hands them to all."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owned = _plan(updates, world)
    sizes = [sum(updates[i].numel() for i in indices) for indices in owned]
    width = max(sizes)
    mine = orthogonalise_stacks([updates[i] for i in owned[rank]], steps, dtype)
    send = torch.cat([r.reshape(-1) for r in mine] + [updates[0].new_zeros(width - sizes[rank], dtype=dtype)])
    gathered = send.new_empty(world * width)
    _all_gather(gathered, send, group)
    result: list[torch.Tensor] = [None] * len(updates)
    for rank_results, size, indices in zip(gathered.split(width), sizes, owned):
        for i, flat in zip(indices, rank_results[:size].split([updates[i].numel() for i in indices])):
            result[i] = flat.view(updates[i].shape).to(updates[i].dtype)
    return result


def _all_gather(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    # all_gather_into_tensor's newer name (torch 2.13 warns at the old one); the old name on older torch.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def rows_sharded(updates: list[torch.Tensor]) -> bool:
    """True when every update is a 2-D DTensor split by rows over one 1-D mesh, as FSDP2 shards a matrix."""
    from torch.distributed.tensor import Shard

    mesh = updates[0].device_mesh
    return all(u.dim() == 2 and u.device_mesh == mesh and tuple(u.placements) == (Shard(0),) for u in updates) \
        and mesh.ndim == 1


def orthogonalise_sharded(updates: list[torch.Tensor], steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """FSDP2: each rank holds rows of every update (DTensor's Shard(0): rank r holds rows [r * k, (r + 1) * k)
    of a matrix of R rows, k = ceil(R / world_size), the last ranks fewer or none). One all-to-all sends each
    matrix's rows to its owner (padded to k rows), which orthogonalises the full matrix; a second sends each rank
    its rows of every result. Returns DTensors placed as the updates are."""
    from torch.distributed.tensor import DTensor

    mesh = updates[0].device_mesh
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    owned = _plan(updates, world)
    rows = [math.ceil(u.size(0) / world) for u in updates]  # one rank's rows of each matrix, padded
    piece = [k * u.size(1) for k, u in zip(rows, updates)]  # ... and their elements
    sizes = [sum(piece[i] for i in indices) for indices in owned]  # one rank's rows of the matrices a rank owns
    local = [u.to_local() for u in updates]

    def pieces(flat: torch.Tensor, indices: list[int]) -> list[tuple[int, torch.Tensor]]:
        """A rank's part of a buffer, as (matrix index, rows x cols view) for the matrices `indices` names."""
        return [(i, p.view(rows[i], -1)) for i, p in zip(indices, flat.split([piece[i] for i in indices]))]

    # 1. Every rank's rows of each matrix to its owner; rows past a rank's own stay zero.
    send = local[0].new_zeros(sum(sizes), dtype=dtype)
    for part, indices in zip(send.split(sizes), owned):
        for i, view in pieces(part, indices):
            view[: local[i].size(0)].copy_(local[i])
    received = send.new_empty(world * sizes[rank])
    dist.all_to_all_single(received, send, [sizes[rank]] * world, sizes, group=group)
    by_source = [pieces(part, owned[rank]) for part in received.split(sizes[rank])]
    full = [torch.cat([views[k][1] for views in by_source])[: updates[i].size(0)] for k, i in enumerate(owned[rank])]
    results = orthogonalise_stacks(full, steps, dtype)
    # 2. Each rank's rows of every result back to it.
    send = received.new_zeros(world * sizes[rank])
    for destination, part in enumerate(send.split(sizes[rank])):
        for (i, view), result in zip(pieces(part, owned[rank]), results):
            own_rows = result[destination * rows[i]: (destination + 1) * rows[i]]
            view[: own_rows.size(0)].copy_(own_rows)
    received = send.new_empty(sum(sizes))
    dist.all_to_all_single(received, send, sizes, [sizes[rank]] * world, group=group)
    result: list[torch.Tensor] = [None] * len(updates)
    for part, indices in zip(received.split(sizes), owned):
        for i, view in pieces(part, indices):
            u = updates[i]
            result[i] = DTensor.from_local(view[: local[i].size(0)].to(u.dtype), mesh, u.placements, run_check=False,
                                           shape=u.shape, stride=u.stride())
    return result


def orthogonalise_everywhere(updates: list[torch.Tensor], steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """DTensors sharded otherwise than by rows on one mesh: every rank gathers every full matrix, orthogonalises
    it and keeps its own part of the result (the same numbers, with redundant work)."""
    from torch.distributed.tensor import distribute_tensor

    results = orthogonalise_stacks([u.full_tensor() for u in updates], steps, dtype)
    return [distribute_tensor(r.to(u.dtype), u.device_mesh, u.placements, src_data_rank=None)
            for r, u in zip(results, updates)]


class Muon(torch.optim.Optimizer):
    """Param groups carry use_muon: Muon's rule for them (lr, momentum, nesterov, ns_steps, weight_decay), else
    AdamW's (lr, betas, eps, weight_decay).

    Like fused AdamW, step() honours the `found_inf` (and `grad_scale`) attributes that GradScaler, and gptrain's
    training step, set on an optimizer that declares _step_supports_amp_scaling: a step with non-finite gradients
    is skipped on the device, so deciding to skip it costs no host-device synchronisation."""

    _step_supports_amp_scaling = True

    def __init__(self, param_groups, lr: float = 0.02, momentum: float = 0.95, betas=(0.9, 0.95), eps: float = 1e-8,
                 ns_dtype: str = "float32", replicated: bool | None = None):
        """ns_dtype: the precision of the orthogonalisation, bfloat16 in a bfloat16 run (an approximate
        orthogonalisation loses nothing by it, and modded-nanogpt runs it so), else float32.
        replicated: whether plain (unsharded) parameters are replicas of one model on every rank of the default
        process group (DDP), whose orthogonalisations are then split across the ranks; None: when that group
        has several ranks. FSDP2's sharded parameters always split theirs."""
        defaults = dict(lr=lr, momentum=momentum, nesterov=True, ns_steps=5, betas=betas, eps=eps, weight_decay=0.0,
                        use_muon=True, ns_dtype=ns_dtype)
        super().__init__(param_groups, defaults)
        self.replicated = replicated

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group, found_inf, grad_scale)
            else:
                self._adamw_step(group, found_inf, grad_scale)

    def _muon_step(self, group: dict, found_inf: torch.Tensor | None, grad_scale: torch.Tensor | None) -> None:
        skip = None if found_inf is None else found_inf.bool()  # a device tensor: never read on the host
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if grad_scale is not None:
            grads = torch._foreach_div(grads, grad_scale)
        buffers = [self._momentum_buffer(p) for p in params]
        # One foreach call per operation over all matrices: the per-matrix Python loop cost ~1 ms a step on a CPU.
        momentum = group["momentum"]
        if skip is None:
            torch._foreach_lerp_(buffers, grads, 1 - momentum)  # momentum * buffer + (1 - momentum) * grad
            moved = buffers
        else:
            moved = torch._foreach_lerp(buffers, grads, 1 - momentum)
            torch._foreach_copy_(buffers, [torch.where(skip, b, m) for b, m in zip(buffers, moved)])
        updates = torch._foreach_lerp(grads, moved, momentum) if group["nesterov"] else moved
        orthogonal = self._orthogonalise(updates, group["ns_steps"], getattr(torch, group["ns_dtype"]))
        for p, update in zip(params, orthogonal):
            self._apply(p, update, group, skip)

    def _orthogonalise(self, updates: list[torch.Tensor], steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """The orthogonalised updates, each matrix's computed on one rank where there are several."""
        if hasattr(updates[0], "device_mesh"):  # DTensors: FSDP2's shards
            if rows_sharded(updates):
                return orthogonalise_sharded(updates, steps, dtype)
            return orthogonalise_everywhere(updates, steps, dtype)
        replicated = self.replicated
        if replicated is None:
            replicated = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if replicated:
            return orthogonalise_replicated(updates, steps, dtype)
        return [r.to(u.dtype) for r, u in zip(orthogonalise_stacks(updates, steps, dtype), updates)]

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

    @staticmethod
    def _apply(p: torch.Tensor, update: torch.Tensor, group: dict, skip: torch.Tensor | None) -> None:
        # An orthogonal update of a tall matrix has small entries; scale so each row moves alike whatever the shape
        # (modded-nanogpt's sqrt(max(1, rows / cols))).
        scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
        if skip is not None:
            update = torch.where(skip, 0.0, update)  # where, not a product: 0 * NaN is NaN
        if group["weight_decay"]:
            decay = group["lr"] * group["weight_decay"]
            p.mul_(1 - decay if skip is None else 1 - decay * (~skip).float())
        p.add_(update, alpha=-group["lr"] * scale)

    def _adamw_step(self, group: dict, found_inf: torch.Tensor | None, grad_scale: torch.Tensor | None) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            # The fused kernels keep the step counters on the device and read nothing back, where the foreach
            # path reads each counter on the host (~200 synchronisations a step for GPT-2); they also skip the
            # update on the device when found_inf is set.
            fused = params[0].device.type in ("cuda", "cpu")
            if not fused and found_inf is not None:
                raise RuntimeError(f"Muon's AdamW groups need fused kernels to skip a step on {params[0].device}")
            beta1, beta2 = group["betas"]
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=fused or None, grad_scale=grad_scale,
                  found_inf=found_inf, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def build_muon(model: torch.nn.Module, weight_decay: float, adam_lr: float, muon_lr: float, momentum: float,
               betas: tuple[float, float], ns_dtype: str = "float32", replicated: bool | None = None) -> Muon:
    """Muon for the 2-D weights inside the transformer blocks; AdamW (with weight decay) for the embeddings and
    the head, and AdamW without decay for 1-D parameters. replicated: as Muon's."""
    hidden, matrices, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and ".h." in f".{name}":
            hidden.append(p)
        elif p.dim() >= 2:
            matrices.append(p)
        else:
            vectors.append(p)
    groups = [
        {"params": hidden, "use_muon": True, "lr": muon_lr, "momentum": momentum},
        {"params": matrices, "use_muon": False, "lr": adam_lr, "weight_decay": weight_decay},
        {"params": vectors, "use_muon": False, "lr": adam_lr, "weight_decay": 0.0},
    ]
    return Muon([g for g in groups if g["params"]], lr=muon_lr, momentum=momentum, betas=betas, ns_dtype=ns_dtype,
                replicated=replicated)
