"""What gptrain adds to the end of a training step, one helper each: the gradient norms (the global one for
clipping and the log, and which tensors went non-finite), the optimizer step skipped when the step is not
finite, and the update ratio. Each works on plain, DDP-replicated and FSDP2-sharded parameters alike: norms are
sums of squares of each rank's own part, added up across ranks when the parameters are sharded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from gptrain.runtime.distributed import all_reduce, local


def grad_norms(params: list[torch.Tensor], sharded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The global gradient norm and, per tensor, whether its gradient is non-finite. The global norm is the norm
    of the per-tensor norms, which the health monitor needs anyway (clip_grad_norm_ computes the same)."""
    squares = torch.stack(torch._foreach_norm([local(p.grad) for p in params])).float().pow(2)  # (P,)
    if sharded:
        squares = all_reduce(squares)
    return squares.sum().sqrt(), ~torch.isfinite(squares)


def needs_clipping(grad_norm: torch.Tensor, grad_clip: float, on_host: bool) -> bool:
    """Whether to scale the gradients down. On a CPU reading the norm is free, and the multiply is skipped when
    the norm is under the limit; on a GPU the multiply (by min(1, clip / norm)) always runs, without a sync."""
    return grad_clip > 0 and not (on_host and grad_norm.item() <= grad_clip)


@contextlib.contextmanager
def skipping_nonfinite(optimizer, scaler, nonfinite: torch.Tensor, on_host: bool) -> Iterator[bool]:
    """Around scaler.step(optimizer): yields whether the host must skip the step (its loss or gradients are not
    finite), or arranges for the step to skip itself.

    With float16, GradScaler finds overflowed gradients itself. Otherwise a fused AdamW or Muon is told through
    `found_inf` (the contract GradScaler uses with them) and skips on the device: a bad step costs no host-device
    synchronisation. On a CPU (on_host), or for an optimizer without that contract, the host decides."""
    if scaler.is_enabled():
        yield False
    elif not on_host and getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf, optimizer.grad_scale = nonfinite.float(), None
        try:
            yield False
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    else:
        yield bool(nonfinite.item())


class UpdateRatio:
    """||w_after - w_before|| / ||w_before|| over all weights: how much of the model one step rewrote.

    The weights before the step are copied into one flat buffer kept between measurements (a fresh copy each time
    would page-fault on a CPU, and one flat tensor takes one norm instead of one per parameter). The copy costs a
    pass over every weight, so it is measured every `interval` iterations, not at every logged step."""

    def __init__(self, params: list[torch.Tensor], sharded: bool, interval: int):
        self.params = params
        self.sharded = sharded
        self.interval = interval
        self._next_iter = 0
        self._before = None  # the flat buffer, allocated at the first measurement
        self._before_views = None  # one view of it per parameter
        self._weight_views = None
        self._weight_norm = None

    def due(self, it: int) -> bool:
        """True at the first call at or after each multiple of interval (the caller asks at logged steps)."""
        if it < self._next_iter:
            return False
        self._next_iter = (it // self.interval + 1) * self.interval
        return True

    def remember_weights(self) -> None:
        weights = self._weights()
        if self._before is None:
            self._before = torch.empty(sum(w.numel() for w in weights), dtype=weights[0].dtype,
                                       device=weights[0].device)
            sizes = [w.numel() for w in weights]
            self._before_views = [v.view_as(w) for v, w in zip(self._before.split(sizes), weights)]
        torch._foreach_copy_(self._before_views, weights)
        self._weight_norm = self._flat_norm(self._before)

    def measure(self) -> torch.Tensor:
        """After the step: the ratio, on the device (reading it is the caller's one synchronisation); NaN where
        the weights were all zero (a ratio to nothing is undefined; the report logs it as missing)."""
        torch._foreach_sub_(self._before_views, self._weights())
        change = self._flat_norm(self._before)
        return torch.where(self._weight_norm > 0, change / self._weight_norm, torch.nan)

    def _weights(self) -> list[torch.Tensor]:
        """Detached views of the weights; kept when unsharded (the storage never moves), rebuilt under FSDP2."""
        if self.sharded or self._weight_views is None:
            self._weight_views = [local(p.detach()) for p in self.params]
        return self._weight_views

    def _flat_norm(self, flat: torch.Tensor) -> torch.Tensor:
        if self.sharded:
            return all_reduce(flat.float().pow(2).sum()).sqrt()
        return torch.linalg.vector_norm(flat)


def weights_finite(params: list[torch.Tensor], sharded: bool) -> bool:
    """True when every weight is finite, on every rank (a checkpoint is never written from a NaN)."""
    finite = torch.tensor(float(all(torch.isfinite(local(p)).all() for p in params)), device=params[0].device)
    if sharded:
        all_reduce(finite, torch.distributed.ReduceOp.MIN)
    return finite.item() > 0
