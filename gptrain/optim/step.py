"""The end of a training step: gradient norms and clipping, the optimizer update (skipped when anything is
non-finite), and the update ratio. Works on plain, DDP-replicated and FSDP2-sharded parameters alike: norms
are sums of squares of each rank's own part, added up across ranks when the parameters are sharded."""

from __future__ import annotations

import torch

from gptrain.runtime.distributed import all_reduce, local


class OptimizerStep:
    def __init__(self, params: list[torch.Tensor], optimizer, scaler, grad_clip: float, sharded: bool):
        self.params = params
        # On a CPU, reading a value costs no device synchronisation, so decisions are taken on the host there:
        # the clip multiply is skipped when the norm is under the limit, and a bad step is skipped directly.
        self.host_decides = params[0].device.type == "cpu"
        self.optimizer = optimizer
        self.scaler = scaler
        self.grad_clip = grad_clip
        self.sharded = sharded  # FSDP2: each rank holds a slice of every parameter and gradient
        self._before = None  # one flat buffer for the update ratio, allocated at the first measured step
        self._before_views = None  # one view of it per parameter
        self._weight_views = None

    def _squared_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Per-tensor squared L2 norms (P,) of the whole tensors, whichever rank holds which part."""
        squares = torch.stack(torch._foreach_norm([local(t) for t in tensors])).float().pow(2)
        return all_reduce(squares) if self.sharded else squares

    def clip_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global gradient norm before clipping, and which tensors have non-finite gradients. The global norm
        is the norm of the per-tensor norms, which the health monitor needs anyway; clip_grads_with_norm_ is
        the second half of clip_grad_norm_."""
        self.scaler.unscale_(self.optimizer)  # clip true gradients, not float16-scaled ones
        squares = self._squared_norms([p.grad for p in self.params])  # (P,)
        total = squares.sum().sqrt()
        if self.grad_clip > 0 and not (self.host_decides and total.item() <= self.grad_clip):
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, total)
        return total, ~torch.isfinite(squares)

    def step(self, nonfinite: torch.Tensor) -> None:
        """Apply the update unless the step is non-finite, without asking the host when that can be avoided."""
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
        elif self.host_decides:
            if not nonfinite.item():
                self.optimizer.step()
        elif getattr(self.optimizer, "_step_supports_amp_scaling", False):
            # Fused AdamW and Muon skip their update on the device when given `found_inf`, the contract
            # GradScaler uses: a bad step costs no host-device sync to detect.
            self.optimizer.found_inf = nonfinite.float()
            self.optimizer.grad_scale = None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        elif not nonfinite.item():  # an optimizer without found_inf support (AdamW off CPU and CUDA): ask the host
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def remember_weights(self) -> torch.Tensor:
        """Copy the weights into a flat buffer kept between measured steps (a fresh copy each time would
        page-fault megabytes on a CPU, and one flat tensor takes one norm instead of one per parameter);
        returns their global norm."""
        weights = self._weights()
        if self._before is None:
            self._before = torch.empty(sum(w.numel() for w in weights), dtype=weights[0].dtype,
                                       device=weights[0].device)
            sizes = [w.numel() for w in weights]
            self._before_views = [v.view_as(w) for v, w in zip(self._before.split(sizes), weights)]
        torch._foreach_copy_(self._before_views, weights)
        return self._flat_norm(self._before)

    def update_norm(self) -> torch.Tensor:
        """||w_after - w_before|| over all weights, computed in the buffer."""
        torch._foreach_sub_(self._before_views, self._weights())
        return self._flat_norm(self._before)

    def _weights(self) -> list[torch.Tensor]:
        """Detached views of the weights; kept when unsharded (the storage never moves), rebuilt under FSDP2."""
        if self.sharded or self._weight_views is None:
            self._weight_views = [local(p.detach()) for p in self.params]
        return self._weight_views

    def _flat_norm(self, flat: torch.Tensor) -> torch.Tensor:
        if self.sharded:
            return all_reduce(flat.float().pow(2).sum()).sqrt()
        return torch.linalg.vector_norm(flat)

    def weights_finite(self) -> bool:
        """True when every weight is finite, on every rank (never checkpoint a NaN)."""
        finite = torch.tensor(float(all(torch.isfinite(local(p)).all() for p in self.params)),
                              device=self.params[0].device)
        if self.sharded:
            all_reduce(finite, torch.distributed.ReduceOp.MIN)
        return finite.item() > 0
