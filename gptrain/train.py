"""The training loop: set up, then for each iteration evaluate when due, set the LR, step, log."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gptrain import checkpoint as ckpt_io
from gptrain.config import TrainConfig, config_to_dict, write_config
from gptrain.data import BatchSampler, check_token_range, load_meta, open_split, resolve_dataset_dir
from gptrain.errors import UserError
from gptrain.lr_schedule import learning_rate
from gptrain.metrics import MetricsLog
from gptrain.model import GPT
from gptrain.runtime import (
    autocast,
    grad_scaler,
    resolve_device,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
)

# Independent random streams derived from the one seed: training batches, and the fixed eval batches.
TRAIN_STREAM, EVAL_TRAIN_STREAM, EVAL_VAL_STREAM = 0, 1, 2


def stream_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


@dataclass
class Progress:
    """Where the loop is; saved in every checkpoint."""

    iter_num: int = 0
    best_val_loss: float = math.inf
    tokens_seen: int = 0
    last_eval_iter: int = -1


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss over the micro-batches, still on the device
    grad_norm: torch.Tensor | None  # global norm before clipping, when it was computed


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.out_dir = Path(config.out_dir)
        self.dataset_meta, self.splits = self._open_dataset()
        seed_everything(config.seed)
        self.model = GPT(config.model_config(self.dataset_meta["vocab_size"])).to(self.device)
        self.optimizer = self.model.configure_optimizer(
            config.weight_decay, config.learning_rate, (config.beta1, config.beta2), self.device.type
        )
        self.scaler = grad_scaler(self.device, self.dtype)
        self.progress = Progress()
        self.train_batches = self._sampler("train", TRAIN_STREAM)
        if config.init_from == "resume":
            self._resume()
        # Compile after loading weights; checkpoints come from self.model, so they never carry `_orig_mod.`.
        self.step_model = torch.compile(self.model) if config.compile else self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    # ----- set-up -------------------------------------------------------------------------------------

    def _open_dataset(self) -> tuple[dict, dict]:
        folder = resolve_dataset_dir(self.config.dataset)
        meta = load_meta(folder)
        splits = {split: open_split(folder, split, meta["dtype"]) for split in ("train", "val")}
        for tokens in splits.values():
            check_token_range(tokens, meta["vocab_size"])
            if tokens.num_tokens <= self.config.block_size:
                raise UserError(
                    f"{tokens.path} holds {tokens.num_tokens} tokens, too few for block_size "
                    f"{self.config.block_size}; lower block_size or prepare more text"
                )
        return meta, splits

    def _sampler(self, split: str, stream: int) -> BatchSampler:
        seed = stream_seed(self.config.seed, stream)
        return BatchSampler(self.splits[split], self.config.batch_size, self.config.block_size, seed, self.device)

    def _resume(self) -> None:
        path = self.out_dir / ckpt_io.LAST
        if not path.is_file():
            raise UserError(f"init_from: resume, but {path} does not exist; train with init_from: scratch first")
        state = ckpt_io.load_checkpoint(path, map_location=self.device)
        saved = ckpt_io.model_config_from(state, path)
        wanted = self.model.config
        if asdict(saved) != asdict(wanted):
            diffs = ", ".join(
                f"{k}: checkpoint {v} vs config {getattr(wanted, k)}"
                for k, v in asdict(saved).items()
                if v != getattr(wanted, k)
            )
            raise UserError(f"{path} was trained with a different model ({diffs}); match the config to it")
        ckpt_io.load_model_weights(self.model, state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        set_rng_state(state["rng"])
        self.train_batches.load_state_dict(state["sampler"])
        print(f"resuming from {path} at iter {self.progress.iter_num}")

    # ----- the loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, self.out_dir / "config.yaml")
        self._print_summary()
        with MetricsLog(self.out_dir / "metrics.jsonl") as metrics:
            self.metrics = metrics
            self._loop()
        if not cfg.eval_only:
            self.save(ckpt_io.LAST)

    def _loop(self) -> None:
        cfg = self.config
        clock = time.perf_counter()
        iters_since_log = 0
        start_iter = self.progress.iter_num
        while True:
            it = self.progress.iter_num
            if self._eval_due(it):
                self.evaluate_and_checkpoint()
                clock = time.perf_counter()  # eval time is not training time
                iters_since_log = 0
            if cfg.eval_only or it >= cfg.max_iters:
                break
            lr = self.set_lr(it)
            log_now = it % cfg.log_interval == 0 or it == cfg.max_iters - 1
            result = self.train_step(need_grad_norm=log_now)
            self.progress.iter_num += 1
            self.progress.tokens_seen += cfg.tokens_per_iter
            iters_since_log += 1
            if log_now:
                now = time.perf_counter()
                self._log_step(it, lr, result, (now - clock) / iters_since_log)
                clock, iters_since_log = now, 0
        print(f"done: {self.progress.iter_num - start_iter} iterations; best val loss {self.progress.best_val_loss:.4f}")

    def _eval_due(self, it: int) -> bool:
        if self.config.eval_only:
            return True
        due = it % self.config.eval_interval == 0 or it == self.config.max_iters
        return due and self.progress.last_eval_iter != it  # a resumed run does not repeat its last eval

    def set_lr(self, it: int) -> float:
        cfg = self.config
        lr = learning_rate(it, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters, cfg.decay_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, need_grad_norm: bool = False) -> StepResult:
        """One optimizer step over gradient_accumulation_steps micro-batches."""
        cfg = self.config
        accum = cfg.gradient_accumulation_steps
        total_loss = torch.zeros((), device=self.device)
        for _ in range(accum):
            x, y = self.train_batches.next_batch()
            with autocast(self.device, self.dtype):
                _, loss = self.step_model(x, y)
                loss = loss / accum  # the sum of the micro-batch gradients is then the mean gradient
            self.train_batches.prefetch()  # host-side gather overlaps the device's forward pass
            self.scaler.scale(loss).backward()
            total_loss += loss.detach()
        grad_norm = self._clip_gradients(need_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(total_loss, grad_norm)

    def _clip_gradients(self, need_grad_norm: bool) -> torch.Tensor | None:
        """Clip to grad_clip; returns the norm before clipping (computed only when clipping or logging)."""
        if self.config.grad_clip <= 0 and not need_grad_norm:
            return None
        self.scaler.unscale_(self.optimizer)  # clip true gradients, not float16-scaled ones
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split, in eval mode (no dropout). The batches are the same
        at every evaluation, so successive values differ only by what the model learned."""
        self.model.eval()
        losses = {}
        for split, stream in (("train", EVAL_TRAIN_STREAM), ("val", EVAL_VAL_STREAM)):
            batches = self._sampler(split, stream)
            total = torch.zeros((), device=self.device)
            for _ in range(self.config.eval_iters):
                x, y = batches.next_batch()
                with autocast(self.device, self.dtype):
                    _, loss = self.step_model(x, y)
                total += loss.float()
            losses[split] = total.item() / self.config.eval_iters
        self.model.train()
        return losses

    def evaluate_and_checkpoint(self) -> None:
        it = self.progress.iter_num
        losses = self.estimate_loss()
        self.progress.last_eval_iter = it
        print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self.metrics.write({"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]})
        improved = losses["val"] < self.progress.best_val_loss
        if improved:
            self.progress.best_val_loss = losses["val"]
        if it > 0 and not self.config.eval_only and (improved or self.config.always_save_checkpoint):
            self.save(ckpt_io.LAST)
            if improved:
                ckpt_io.link_or_copy(self.out_dir / ckpt_io.LAST, self.out_dir / ckpt_io.BEST)

    def _log_step(self, it: int, lr: float, result: StepResult, seconds_per_iter: float) -> None:
        loss = result.loss.item()
        tokens_per_s = self.config.tokens_per_iter / seconds_per_iter
        row = {"iter": it, "loss": loss, "lr": lr, "ms": seconds_per_iter * 1000, "tokens_per_s": tokens_per_s}
        line = f"iter {it}: loss {loss:.4f}, lr {lr:.2e}"
        if result.grad_norm is not None:
            row["grad_norm"] = result.grad_norm.item()
            line += f", grad norm {row['grad_norm']:.3f}"
        print(f"{line}, time {row['ms']:.1f}ms, {tokens_per_s:,.0f} tok/s")
        self.metrics.write(row)

    # ----- checkpoints --------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "model_config": asdict(self.model.config),
            "train_config": config_to_dict(self.config),
            "dataset_meta": self.dataset_meta,
            "progress": asdict(self.progress),
            "rng": rng_state(),
            "sampler": self.train_batches.state_dict(),
        }

    def save(self, name: str) -> None:
        ckpt_io.save_checkpoint(self.checkpoint_state(), self.out_dir / name)

    def _print_summary(self) -> None:
        cfg = self.config
        print(
            f"model: {self.model.num_params() / 1e6:.2f}M parameters "
            f"({self.model.num_params(non_embedding=True) / 1e6:.2f}M without position embeddings); "
            f"device {self.device}, {str(self.dtype).removeprefix('torch.')}"
            f"{', compiled' if cfg.compile else ''}; {cfg.tokens_per_iter:,} tokens per iteration"
        )


def train(config: TrainConfig) -> Trainer:
    trainer = Trainer(config)
    trainer.run()
    return trainer
