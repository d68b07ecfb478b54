"""The health monitor: non-finite steps, gradient-norm spikes, update ratios out of band, overfitting.

Non-finite steps are detected on the device every step and only read by the host at logged steps (and
every max_bad_steps iterations), so watching them costs no host-device synchronisation on the hot path.
The other checks look at figures the loop reads anyway when it logs or evaluates.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable

import torch

from gptrain.config import TrainConfig
from gptrain.errors import TrainingHalted

SPIKE_HISTORY = 50  # logged grad norms the running median covers
SPIKE_MIN_HISTORY = 10  # no spike verdicts before this many norms are known
RATIO_WINDOW = 10  # consecutive logged update ratios that must all be out of band


class HealthMonitor:
    def __init__(
        self,
        param_names: list[str],
        device: torch.device,
        emit: Callable[[int, str, str], None],
        *,
        max_bad_steps: int,
        grad_spike_factor: float,
        update_ratio_band: tuple[float, float],
        overfit_evals: int,
        hint: str,
        resume_advice: Callable[[], str] = lambda: "start again",
    ):
        self.param_names = param_names
        self.emit = emit  # emit(iter, kind, message)
        self.max_bad_steps = max_bad_steps
        self.grad_spike_factor = grad_spike_factor
        self.update_ratio_band = update_ratio_band
        self.overfit_evals = overfit_evals
        self.hint = hint  # the run's settings, quoted in the advice when training stops
        self.resume_advice = resume_advice  # how to continue, naming only a checkpoint that exists
        # Device-side accumulators, written every step without a sync.
        self.bad_streak = torch.zeros((), device=device)  # consecutive non-finite steps up to the latest
        self.bad_count = torch.zeros((), device=device)  # non-finite steps since the last read
        self.bad_params = torch.zeros(len(param_names), dtype=torch.bool, device=device)
        self.last_read_iter = -1
        self.bad_steps_total = 0
        self.grad_norms: deque[float] = deque(maxlen=SPIKE_HISTORY)
        self.update_ratios: deque[float] = deque(maxlen=RATIO_WINDOW)
        self.evals: list[tuple[int, float, float]] = []

    @classmethod
    def for_run(cls, config: TrainConfig, model: torch.nn.Module, emit: Callable[[int, str, str], None],
                dtype_name: str, resume_advice: Callable[[], str]) -> HealthMonitor:
        """The monitor with the run's thresholds, watching every trainable parameter."""
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        return cls(names, next(model.parameters()).device, emit, max_bad_steps=config.max_bad_steps,
                   grad_spike_factor=config.grad_spike_factor, overfit_evals=config.overfit_evals,
                   update_ratio_band=(config.update_ratio_min, config.update_ratio_max),
                   hint=f"learning_rate {config.learning_rate:g}, grad_clip {config.grad_clip:g}, dtype {dtype_name}",
                   resume_advice=resume_advice)

    # ----- every step, on the device --------------------------------------------------------------------

    def record_step(self, nonfinite: torch.Tensor, param_nonfinite: torch.Tensor) -> None:
        bad = nonfinite.float()
        self.bad_streak.mul_(bad).add_(bad)  # reset to 0 by a good step, +1 by a bad one
        self.bad_count.add_(bad)
        self.bad_params.logical_or_(param_nonfinite)

    # ----- when the host reads ----------------------------------------------------------------------------

    def read_bad_steps(self, it: int) -> int:
        """Report non-finite steps since the last read; stop the run after max_bad_steps in a row."""
        count = int(self.bad_count.item())
        first, self.last_read_iter = self.last_read_iter + 1, it
        if count == 0:
            return 0
        names = [n for n, bad in zip(self.param_names, self.bad_params.tolist()) if bad]
        streak = int(self.bad_streak.item())
        self.bad_steps_total += count
        where = _summarise_names(names) or "the loss only"
        self.emit(it, "nonfinite", f"{count} step(s) with non-finite loss or gradients in iters {first}..{it} were "
                                   f"skipped (weights untouched); non-finite gradients in: {where}")
        self.bad_count.zero_()
        self.bad_params.zero_()
        if streak >= self.max_bad_steps:
            raise TrainingHalted(
                f"training stopped at iter {it}: {streak} consecutive steps had a non-finite loss or gradient "
                f"(from iter {it - streak + 1}; in {where}). The likely cause is a learning rate too high for this "
                f"model or float16 overflow ({self.hint}); lower learning_rate, set grad_clip: 1.0, or use "
                f"dtype: bfloat16 or float32; then {self.resume_advice()}"
            )
        return count

    def check_logged_step(self, it: int, grad_norm: float | None, update_ratio: float | None, warmup: bool) -> None:
        if grad_norm is not None and math.isfinite(grad_norm):
            self._check_spike(it, grad_norm)
        if update_ratio is not None and not warmup:
            self._check_update_ratio(it, update_ratio)

    def _check_spike(self, it: int, grad_norm: float) -> None:
        if len(self.grad_norms) >= SPIKE_MIN_HISTORY:
            median = statistics.median(self.grad_norms)
            if median > 0 and grad_norm > self.grad_spike_factor * median:  # a zero median: no scale to spike from
                self.emit(it, "grad_spike", f"gradient norm {grad_norm:.3g} at iter {it} is "
                                            f"{grad_norm / median:.1f}x its running median {median:.3g}")
        self.grad_norms.append(grad_norm)

    def _check_update_ratio(self, it: int, ratio: float) -> None:
        self.update_ratios.append(ratio)
        low, high = self.update_ratio_band
        if len(self.update_ratios) < RATIO_WINDOW:
            return
        median = statistics.median(self.update_ratios)
        if all(r < low for r in self.update_ratios):
            self.emit(it, "update_ratio", f"update/weight ratio {median:.2e} has stayed below {low:g} for "
                                          f"{RATIO_WINDOW} logged steps: the weights barely move; the learning "
                                          "rate may be too low")
        elif all(r > high for r in self.update_ratios):
            self.emit(it, "update_ratio", f"update/weight ratio {median:.2e} has stayed above {high:g} for "
                                          f"{RATIO_WINDOW} logged steps: each step rewrites a large part of the "
                                          "weights; the learning rate may be too high")

    def check_eval(self, it: int, train_loss: float, val_loss: float) -> None:
        """Overfitting: val loss rose at each of the last overfit_evals evaluations while train loss fell."""
        self.evals.append((it, train_loss, val_loss))
        recent = self.evals[-(self.overfit_evals + 1):]
        if len(recent) <= self.overfit_evals:
            return
        val_rising = all(b[2] > a[2] for a, b in zip(recent, recent[1:]))
        train_falling = all(b[1] < a[1] for a, b in zip(recent, recent[1:]))
        if val_rising and train_falling:
            best_it, _, best_val = min(self.evals, key=lambda e: e[2])
            self.emit(it, "overfitting", f"val loss rose for {self.overfit_evals} evaluations in a row "
                                         f"({recent[0][2]:.4f} -> {val_loss:.4f}) while train loss fell "
                                         f"({recent[0][1]:.4f} -> {train_loss:.4f}): the model is overfitting; "
                                         f"the best val loss was {best_val:.4f} at iter {best_it} "
                                         f"({'ckpt_best.pt' if best_it > 0 else 'before training: not saved'})")


def _summarise_names(names: list[str], limit: int = 6) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" and {len(names) - limit} more"


class RateLimiter:
    """At most one message of each kind per eval interval, so a persistent problem does not flood the log."""

    def __init__(self, eval_interval: int):
        self.eval_interval = eval_interval
        self.last_window: dict[str, int] = {}

    def allow(self, it: int, kind: str) -> bool:
        window = it // self.eval_interval
        if self.last_window.get(kind) == window:
            return False
        self.last_window[kind] = window
        return True
