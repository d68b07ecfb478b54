"""Muon (Keller Jordan 2024): momentum SGD whose update for each 2-D hidden weight matrix is orthogonalised by a
Newton-Schulz iteration, so every direction of the matrix moves by about the same amount. Embeddings, the LM head
and 1-D parameters keep AdamW (torch's own implementation, called functionally), each group with its own
learning rate, in one optimizer object so checkpoints, resume and the training loop see a single optimizer.

Under FSDP2 a sharded matrix is gathered in full on every rank, orthogonalised there, and each rank keeps its own
rows of the result: the same numbers as one process, at the price of an all-gather per matrix and redundant work.
Under DDP every rank holds the full (already averaged) gradient and orthogonalises it itself.
"""

from __future__ import annotations

import torch
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


def _orthogonalise(updates: list[torch.Tensor], steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Orthogonalise matrices of one shape up to transposition as one batch: a block's (4C, C) and (C, 4C) weights
    are iterated together in their wide orientation. The full matrices are needed: FSDP2 shards are gathered
    first, and each rank keeps its own part of the result."""
    sharded = hasattr(updates[0], "full_tensor")
    full = [u.full_tensor() if sharded else u for u in updates]
    tall = [m.size(-2) > m.size(-1) for m in full]
    wide = torch.stack([m.mT if t else m for m, t in zip(full, tall)])  # (n, rows, cols), rows <= cols
    result = [r.mT if t else r for r, t in zip(newton_schulz(wide, steps, dtype).unbind(0), tall)]
    if not sharded:
        return result
    from torch.distributed.tensor import distribute_tensor

    return [distribute_tensor(r, u.device_mesh, u.placements, src_data_rank=None) for r, u in zip(result, updates)]


class Muon(torch.optim.Optimizer):
    """Param groups carry use_muon: Muon's rule for them (lr, momentum, nesterov, ns_steps, weight_decay), else
    AdamW's (lr, betas, eps, weight_decay).

    Like fused AdamW, step() honours the `found_inf` (and `grad_scale`) attributes that GradScaler, and gptrain's
    training step, set on an optimizer that declares _step_supports_amp_scaling: a step with non-finite gradients
    is skipped on the device, so deciding to skip it costs no host-device synchronisation."""

    _step_supports_amp_scaling = True

    def __init__(self, param_groups, lr: float = 0.02, momentum: float = 0.95, betas=(0.9, 0.95), eps: float = 1e-8,
                 ns_dtype: str = "float32"):
        """ns_dtype: the precision of the orthogonalisation, bfloat16 in a bfloat16 run (an approximate
        orthogonalisation loses nothing by it, and modded-nanogpt runs it so), else float32."""
        defaults = dict(lr=lr, momentum=momentum, nesterov=True, ns_steps=5, betas=betas, eps=eps, weight_decay=0.0,
                        use_muon=True, ns_dtype=ns_dtype)
        super().__init__(param_groups, defaults)

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
        by_shape: dict[tuple, list] = {}
        for p, update in zip(params, updates):
            by_shape.setdefault(tuple(sorted(p.shape)), []).append((p, update))
        for items in by_shape.values():
            orthogonal = _orthogonalise([u for _, u in items], group["ns_steps"], getattr(torch, group["ns_dtype"]))
            for (p, _), update in zip(items, orthogonal):
                self._apply(p, update, group, skip)

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
               betas: tuple[float, float], ns_dtype: str = "float32") -> Muon:
    """Muon for the 2-D weights inside the transformer blocks; AdamW (with weight decay) for the embeddings and
    the head, and AdamW without decay for 1-D parameters."""
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
    return Muon([g for g in groups if g["params"]], lr=muon_lr, momentum=momentum, betas=betas, ns_dtype=ns_dtype)
