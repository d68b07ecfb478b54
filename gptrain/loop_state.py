"""Where the training loop stands: the iteration, the best validation loss so far, and the evaluations since
then (which early stopping counts). A stateful part of every checkpoint (saved as "progress")."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from gptrain.config import TrainConfig
from gptrain.errors import UserError


@dataclass
class LoopState:
    iter_num: int = 0
    best_val_loss: float = math.inf
    best_iter: int = -1  # the evaluation that gave best_val_loss (-1: none yet)
    last_eval_iter: int = -1
    evals_since_best: int = 0  # evaluations in a row without a better val loss (early_stop_evals counts them)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """Every field must be there and a number (a damaged file must fail here, not mid-run)."""
        for f in fields(self):
            value = saved[f.name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"progress.{f.name} is {value!r}, not a number")
            setattr(self, f.name, value)

    def record_eval(self, it: int, val_loss: float) -> bool:
        """Count an evaluation; True when it is a new best."""
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_iter, self.evals_since_best = val_loss, it, 0
        else:
            self.evals_since_best += 1
        return improved

    def out_of_patience(self, config: TrainConfig, it: int) -> bool:
        """early_stop_evals evaluations in a row without a better val loss, before the end (where a run stops
        anyway)."""
        patience = config.early_stop_evals
        return bool(patience) and self.evals_since_best >= patience and it < config.max_iters and not config.eval_only

    def check_resumable(self, config: TrainConfig, path: Path, best_file: Path) -> None:
        """A resumed run must have something left to do under config; the error says what to change."""
        it = self.iter_num
        if it >= config.max_iters and not config.eval_only:
            raise UserError(f"{path} is at iter {it}, and max_iters is {config.max_iters}: nothing is left to "
                            f"train; raise max_iters above {it} (or set eval_only: true)")
        if self.out_of_patience(config, it):  # it would stop again at once, for the reason it stopped
            raise UserError(f"{path} is at iter {it}, where {self.early_stop_reason(config, best_file)}; raise "
                            f"early_stop_evals above {self.evals_since_best} (or set it to 0) to train on")

    def best_model_note(self, best_file: Path) -> str:
        """Where the best model is, said truthfully: an iteration-0 best was never saved."""
        if self.best_iter < 0:
            return "no evaluation yet"
        where = ("before any training, so no checkpoint holds it" if self.best_iter == 0
                 else f"in {best_file}" if best_file.is_file() else "not saved")
        return f"best val loss {self.best_val_loss:.4f} at iter {self.best_iter} ({where})"

    def early_stop_reason(self, config: TrainConfig, best_file: Path) -> str:
        return (f"val loss has not improved for {self.evals_since_best} evaluations in a row (early_stop_evals: "
                f"{config.early_stop_evals}); {self.best_model_note(best_file)}")
