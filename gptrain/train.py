"""The training loop: set up, then for each iteration evaluate when due, set the LR, step, log.

One process, or one of several under torchrun: then rank 0 alone prints, writes metrics.jsonl and
checkpoints, and every rank takes part in the collectives (gradient reduction, evaluation, saving).
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from gptrain import checkpoint as ckpt_io
from gptrain.config import TrainConfig, config_to_dict, write_config
from gptrain.data.dataset import (
    BatchSampler,
    check_same_tokenizer,
    check_token_range,
    load_meta,
    open_split,
    resolve_dataset_dir,
)
from gptrain.errors import CheckpointWriteError, Interrupted, UserError, one_line
from gptrain.model import GPT
from gptrain.monitor.console import ProgressReporter, quiet_bar
from gptrain.monitor.flops import device_name, model_flops_per_token, peak_flops
from gptrain.monitor.health import HealthMonitor, RateLimiter
from gptrain.monitor.metrics import MetricsLog, NullMetrics, cut_back
from gptrain.optim.muon import build_muon
from gptrain.optim.schedule import learning_rate
from gptrain.optim.step import OptimizerStep
from gptrain.runtime import distributed as dist_util
from gptrain.runtime import outdir
from gptrain.runtime.device import (
    autocast,
    check_fits_in_memory,
    configure_backends,
    grad_scaler,
    resolve_compile,
    resolve_device,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
)
from gptrain.runtime.signals import Abandoned, GracefulInterrupt

# Independent random streams derived from the one seed: training batches, the fixed eval batches, dropout.
TRAIN_STREAM, EVAL_TRAIN_STREAM, EVAL_VAL_STREAM, DROPOUT_STREAM = 0, 1, 2, 3
# Model keys a checkpoint decides, whatever the config says: padding changes the storage, not the model.
PADDING_KEYS = ("vocab_pad_multiple",)
# Gather full (unsharded) state dicts onto rank 0's CPU, so a checkpoint loads anywhere.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def stream_seed(seed: int, stream: int, rank: int = 0, *more: int) -> int:
    """Rank 0 draws the streams of a single process; every other rank its own, deterministic given the rank."""
    keys = [seed, stream] + ([rank, *more] if rank or more else [])
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""

    iter_num: int = 0
    best_val_loss: float = math.inf
    best_iter: int = -1  # the evaluation that gave best_val_loss (-1: none yet)
    tokens_seen: int = 0
    last_eval_iter: int = -1

    @classmethod
    def from_dict(cls, saved: dict) -> LoopState:
        """A checkpoint's loop state, with every field a number (a damaged file must fail here, not mid-run)."""
        state = cls(**saved)
        for name, value in asdict(state).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"progress.{name} is {value!r}, not a number")
        return state


@dataclass
class StepResult:
    """One optimizer step's figures, still on the device: reading them is the caller's (one) sync."""

    loss: torch.Tensor  # mean loss over the micro-batches
    grad_norm: torch.Tensor  # global gradient norm before clipping
    update_ratio: torch.Tensor | None  # ||delta w|| / ||w|| over all weights, when measured


class Trainer:
    def __init__(self, config: TrainConfig, overwrite: bool = False, ctx: dist_util.DistContext | None = None):
        """Every check of the inputs happens here, before run() writes anything into out_dir."""
        self.config = config
        self.overwrite = overwrite
        self.ctx = ctx or dist_util.DistContext()
        self.device = dist_util.process_device(self.ctx, resolve_device(config.device))
        self.dtype = resolve_dtype(config.dtype, self.device)
        configure_backends(self.device)
        dist_util.validate(self.ctx, config.gradient_accumulation_steps, config.parallel, self.dtype)
        self.micro_steps = config.gradient_accumulation_steps // self.ctx.world_size  # this rank's share
        self.out_dir = Path(config.out_dir)
        self.dataset_meta, self.splits = self._open_dataset()
        resume_state = self._load_resume_state() if config.init_from == "resume" else None
        model_config = config.model_config(self.dataset_meta["vocab_size"])
        if resume_state:  # a checkpoint's padding is kept (checkpoints from before padding have none)
            model_config.vocab_pad_multiple = resume_state["model_config"].get("vocab_pad_multiple", 1)
        check_fits_in_memory(model_config, self.device, config.batch_size, config.block_size)

        seed_everything(config.seed)  # the same initial weights on every rank
        if config.init_from.startswith("from:"):
            self.model = self._pretrained_model(Path(config.init_from[len("from:"):])).to(self.device)
        else:
            self.model = GPT(model_config).to(self.device)
        if resume_state:
            ckpt_io.load_model_weights(self.model, resume_state, self.out_dir / ckpt_io.LAST)
        self.model.checkpoint_blocks = config.activation_checkpointing
        if self.ctx.distributed:
            torch.manual_seed(stream_seed(config.seed, DROPOUT_STREAM, self.ctx.rank))  # dropout differs by rank
        self.compiled = resolve_compile(config.compile, self.device)
        wrapped = dist_util.wrap_model(self.model, config.parallel, self.ctx, self.device, self.dtype,
                                       compile_blocks=self.compiled)
        self.sharded = dist_util.uses_fsdp(self.model)
        self.autocast_dtype = torch.float32 if self.sharded else self.dtype  # FSDP2 casts the parameters itself
        self.optimizer = self._build_optimizer()
        self.scaler = grad_scaler(self.device, self.dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.stepper = OptimizerStep(self.params, self.optimizer, self.scaler, config.grad_clip, self.sharded)
        self.progress = LoopState()
        self.train_batches = self._sampler("train", TRAIN_STREAM)
        if resume_state:
            self._restore(resume_state)
            self._check_work_left()
        # Compile last; checkpoints come from self.model, so they never carry `_orig_mod.` or `module.`. FSDP2's
        # blocks were compiled one by one before sharding (torchtitan's way), so its root stays as it is.
        # Evaluation runs the same compiled model: its eval-mode graph is compiled once, at the first
        # evaluation, and cached beside the training graph, so later evaluations recompile nothing.
        self.step_model = torch.compile(wrapped) if self.compiled and not self.sharded else wrapped
        self.wrapped = wrapped
        self.metrics = NullMetrics()
        self.reporter = ProgressReporter(0, 0, bar=False, quiet=True)
        self.interrupt = GracefulInterrupt()
        self._last_saved_iter = None
        self._next_ratio_iter = 0
        self.checkpoint_iter = self.progress.iter_num if resume_state else None  # what ckpt_last.pt holds
        self.resume_metrics_length = resume_state.get("metrics_length") if resume_state else None
        self.limiter = RateLimiter(config.eval_interval)
        self.health = HealthMonitor(
            [n for n, p in self.model.named_parameters() if p.requires_grad], self.device, self.warn,
            max_bad_steps=config.max_bad_steps,
            grad_spike_factor=config.grad_spike_factor,
            update_ratio_band=(config.update_ratio_min, config.update_ratio_max),
            overfit_evals=config.overfit_evals,
            hint=f"learning_rate {config.learning_rate:g}, grad_clip {config.grad_clip:g}, "
                 f"dtype {str(self.dtype).removeprefix('torch.')}",
            resume_advice=self.resume_advice,
        )

    # ----- set-up -------------------------------------------------------------------------------------

    def _open_dataset(self) -> tuple[dict, dict]:
        folder = resolve_dataset_dir(self.config.dataset)
        meta = load_meta(folder)
        splits = {split: open_split(folder, split, meta["dtype"]) for split in ("train", "val")}
        for tokens in splits.values():
            check_token_range(tokens, meta["vocab_size"], meta)
            if tokens.num_tokens <= self.config.block_size:
                raise UserError(
                    f"{tokens.path} holds {tokens.num_tokens} tokens, too few for block_size "
                    f"{self.config.block_size}; lower block_size or prepare more text"
                )
        return meta, splits

    def _sampler(self, split: str, stream: int, *more: int) -> BatchSampler:
        seed = stream_seed(self.config.seed, stream, self.ctx.rank, *more)
        return BatchSampler(self.splits[split], self.config.batch_size, self.config.block_size, seed, self.device,
                            self.dataset_meta["vocab_size"])

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        betas = (cfg.beta1, cfg.beta2)
        if cfg.optimizer == "muon":
            ns_dtype = "bfloat16" if self.dtype == torch.bfloat16 else "float32"
            optimizer = build_muon(self.model, cfg.weight_decay, cfg.learning_rate, cfg.muon_lr, cfg.muon_momentum,
                                   betas, ns_dtype)
        else:
            optimizer = self.model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, betas, self.device.type)
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]  # the schedule scales every group's own rate alike
        return optimizer

    def _load_resume_state(self) -> dict:
        path = self.out_dir / ckpt_io.LAST
        if not path.is_file():
            raise UserError(f"init_from: resume, but {path} does not exist; train with init_from: scratch first")
        state = ckpt_io.load_checkpoint(path)
        if "optimizer" not in state:
            raise UserError(f"{path} holds weights only (no training state to resume); fine-tune from it with "
                            f"init_from: from:{self.out_dir}")
        saved = asdict(ckpt_io.model_config_from(state, path))
        wanted = asdict(self.config.model_config(self.dataset_meta["vocab_size"]))
        diffs = ", ".join(f"{k}: checkpoint {v} vs config {wanted[k]}" for k, v in saved.items()
                          if v != wanted[k] and k not in PADDING_KEYS)
        if diffs:
            raise UserError(f"{path} was trained with a different model ({diffs}); match the config to it")
        check_same_tokenizer(state.get("dataset_meta"), self.dataset_meta, path)
        saved_meta = state.get("dataset_meta") or {}
        counts = [(saved_meta.get(k), self.dataset_meta.get(k)) for k in ("train_tokens", "val_tokens")]
        if self.ctx.is_main and any(a is not None and a != b for a, b in counts):
            print(f"note: the dataset differs from the one {path} was trained on (train/val tokens "
                  f"{counts[0][0]}/{counts[1][0]} then, {counts[0][1]}/{counts[1][1]} now); training continues on it")
        return state

    def _check_work_left(self) -> None:
        it = self.progress.iter_num
        if it >= self.config.max_iters and not self.config.eval_only:
            raise UserError(f"{self.out_dir / ckpt_io.LAST} is at iter {it}, and max_iters is {self.config.max_iters}: "
                            f"nothing is left to train; raise max_iters above {it} (or set eval_only: true)")

    def _pretrained_model(self, source: Path) -> GPT:
        """Weights to fine-tune: a gptrain checkpoint or run folder, or a Hugging Face GPT-2 folder. The config
        must describe the same model, but may shorten block_size (the position table is cropped) and set its
        own dropout; training starts at iteration 0 with a fresh optimizer."""
        state = load_pretrained(source)
        check_same_tokenizer(state.get("dataset_meta"), self.dataset_meta, source)
        saved = ckpt_io.model_config_from(state, source)
        wanted = self.config.model_config(self.dataset_meta["vocab_size"])
        diffs = [f"{k}: {v} there vs {getattr(wanted, k)} here" for k, v in asdict(saved).items()
                 if k not in ("block_size", "dropout", *PADDING_KEYS) and v != getattr(wanted, k)]
        if diffs:
            raise UserError(f"init_from {source} is a different model ({', '.join(diffs)}); match the config to it "
                            "(vocab_size comes from the dataset: prepare it with the model's tokenizer)")
        if wanted.block_size > saved.block_size:
            raise UserError(f"block_size {wanted.block_size} is longer than the {saved.block_size} positions "
                            f"{source} was trained with; use at most {saved.block_size}")
        saved.dropout = wanted.dropout
        model = GPT(saved)
        ckpt_io.load_model_weights(model, state, source)
        if wanted.block_size < saved.block_size:
            model.crop_block_size(wanted.block_size)
        if self.ctx.is_main:
            print(f"fine-tuning from {source}")
        return model

    def _restore(self, state: dict) -> None:
        """Everything but the weights: optimizer, scaler, loop state, random streams."""
        try:
            self._restore_training_state(state)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            raise UserError(f"{self.out_dir / ckpt_io.LAST} cannot be resumed: its training state is damaged or "
                            f"from another version ({one_line(exc)}); fine-tune from its weights with "
                            f"init_from: from:{self.out_dir / ckpt_io.LAST}") from None

    def _restore_training_state(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.progress = LoopState.from_dict(state["progress"])
        saved_world = state.get("world_size", 1)
        if saved_world == self.ctx.world_size:
            mine = state["ranks"][self.ctx.rank] if self.ctx.distributed else state
            set_rng_state(mine["rng"])
            self.train_batches.load_state_dict(mine["sampler"])
            note = ""
        else:
            # Another world size: no saved stream belongs to this rank; start fresh, deterministic ones.
            it = self.progress.iter_num
            torch.manual_seed(stream_seed(self.config.seed, DROPOUT_STREAM, self.ctx.rank, it))
            self.train_batches = self._sampler("train", TRAIN_STREAM, it)
            note = f" (saved by {saved_world} process(es), now {self.ctx.world_size}: batches follow new streams)"
        if self.ctx.is_main:
            print(f"resuming from {self.out_dir / ckpt_io.LAST} at iter {self.progress.iter_num}{note}")

    # ----- the loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.config
        self.flops_per_token = model_flops_per_token(self.model, cfg.block_size)
        self.peak_flops = peak_flops(self.device, self.dtype)
        if self.ctx.is_main:
            self._prepare_out_dir()
            self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        dist_util.barrier()
        self.reporter = ProgressReporter(self.progress.iter_num, cfg.max_iters, quiet=not self.ctx.is_main)
        try:
            with self.interrupt, self.metrics:
                if self.ctx.is_main:
                    self._print_summary()
                self.metrics.write(self._start_row())
                self._loop()
                if not cfg.eval_only and self._last_saved_iter != self.progress.iter_num:
                    self.save(ckpt_io.LAST)
        finally:
            self.reporter.close()

    def release(self) -> None:
        """Drop the model, optimizer and wrappers while the process group still exists. Collective work that
        DDP or FSDP2 keep referenced would otherwise be destroyed at interpreter shutdown, which can abort the
        process (seen with gloo, about one run in six)."""
        for name in ("step_model", "wrapped", "model", "optimizer", "stepper", "params"):
            self.__dict__.pop(name, None)
        gc.collect()

    def _prepare_out_dir(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(".*.tmp"):  # left by a process killed while writing
            stale.unlink()
        if self.overwrite and self.config.init_from != "resume":
            outdir.clear_previous(self.out_dir)
        if self.config.init_from == "resume":
            removed = cut_back(self.out_dir / "metrics.jsonl", self.resume_metrics_length, self.progress.iter_num)
            if removed:
                print(f"metrics.jsonl: removed {removed} line(s) logged after the checkpoint")
        write_config(self.config, self.out_dir / "config.yaml")

    def _loop(self) -> None:
        cfg = self.config
        clock = time.perf_counter()
        iters_since_log = 0
        start_iter = self.progress.iter_num
        train_seconds = 0.0  # wall time of the steps alone, evaluations and checkpoints excluded
        while True:
            it = self.progress.iter_num
            saved = False
            if self._eval_due(it):
                train_seconds += time.perf_counter() - clock
                saved = self.evaluate_and_checkpoint()
                clock = time.perf_counter()
                iters_since_log = 0
                if self.interrupt.requested and not self.ctx.distributed:
                    self._stop_for_signal()
            if cfg.checkpoint_interval and it % cfg.checkpoint_interval == 0 and it > start_iter and not saved:
                self.save(ckpt_io.LAST)
            if cfg.eval_only or it >= cfg.max_iters:
                break
            lr = self.set_lr(it)
            log_now = it % cfg.log_interval == 0 or it == cfg.max_iters - 1
            result = self.train_step(measure=log_now and self._ratio_due(it))
            if result is None:  # a signal came between micro-batches: the step was undone
                self._stop_for_signal()
            self.progress.iter_num += 1
            self.progress.tokens_seen += cfg.tokens_per_iter
            iters_since_log += 1
            self.reporter.advance()
            # The host reads the device only at logged steps: between them a step queues its work and goes on.
            if log_now:
                self.health.read_bad_steps(it)
                now = time.perf_counter()
                self._log_step(it, lr, result, (now - clock) / iters_since_log)
                train_seconds += now - clock
                clock, iters_since_log = now, 0
            if self._should_stop(log_now):
                self._stop_for_signal()
        done = self.progress.iter_num - start_iter
        pace = f" in {train_seconds:.1f}s of training ({train_seconds / done * 1000:.1f} ms/iter)" if done else ""
        self.reporter.message(f"done: {done} iterations{pace}; {self.best_model_note()}")

    def best_model_note(self) -> str:
        """Where the best model is, said truthfully: an iteration-0 best was never saved."""
        p = self.progress
        if p.best_iter < 0:
            return "no evaluation yet"
        where = (f"in {self.out_dir / ckpt_io.BEST}" if p.best_iter > 0 and (self.out_dir / ckpt_io.BEST).is_file()
                 else "before any training, so no checkpoint holds it" if p.best_iter == 0
                 else "not saved")
        return f"best val loss {p.best_val_loss:.4f} at iter {p.best_iter} ({where})"

    def _ratio_due(self, it: int) -> bool:
        """The update ratio copies every weight: measured at the first logged step at or after each multiple of
        update_ratio_interval, not at every logged step."""
        if it < self._next_ratio_iter:
            return False
        interval = self.config.update_ratio_interval
        self._next_ratio_iter = (it // interval + 1) * interval
        return True

    def _should_stop(self, host_reads_now: bool) -> bool:
        """A single process checks after every step. Ranks must agree on the step they stop after, so they
        vote (one all-reduce) only where they read from the device anyway."""
        if not self.ctx.distributed:
            return self.interrupt.requested
        if not host_reads_now:
            return False
        vote = torch.tensor(float(self.interrupt.requested), device=self.device)
        return dist_util.all_reduce(vote, torch.distributed.ReduceOp.MAX).item() > 0

    def _stop_for_signal(self) -> None:
        """The loop stands between two steps: save where it stands and say how to continue."""
        it = self.progress.iter_num
        saved = not self.config.eval_only and self.save(ckpt_io.LAST)
        signum = self.interrupt.signum or 15  # a rank that got no signal itself stops with its peers
        what = f"saved {self.out_dir / ckpt_io.LAST}; " if saved else "nothing was saved; "
        raise Interrupted(signum, f"interrupted by {_signal_label(signum)} at iter {it}: {what}"
                                  f"{self.resume_advice()}")

    def resume_advice(self) -> str:
        """How to continue, pointing only at a checkpoint that exists."""
        if self.checkpoint_iter is None or not (self.out_dir / ckpt_io.LAST).is_file():
            return "no checkpoint was written yet, so start the run again (with --overwrite)"
        return (f"continue from {self.out_dir / ckpt_io.LAST} (iter {self.checkpoint_iter}) with the same command "
                "plus --init_from=resume")

    def _eval_due(self, it: int) -> bool:
        if self.config.eval_only:
            return True
        due = it % self.config.eval_interval == 0 or it == self.config.max_iters
        return due and self.progress.last_eval_iter != it  # a resumed run does not repeat its last eval

    def set_lr(self, it: int) -> float:
        """Set every group's rate for iteration `it`; returns the rate of learning_rate's groups (logged)."""
        cfg = self.config
        min_ratio = cfg.min_lr / cfg.learning_rate if cfg.learning_rate else 0.0
        factor = learning_rate(it, 1.0, min_ratio, cfg.warmup_iters, cfg.lr_decay_iters, cfg.decay_lr,
                               cfg.lr_schedule, cfg.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return cfg.learning_rate * factor

    def train_step(self, measure: bool = False) -> StepResult | None:
        """One optimizer step over this rank's share of gradient_accumulation_steps micro-batches. Gradients
        are reduced across ranks once, on the last micro-batch. A step whose loss or gradients are not finite
        leaves the weights untouched. measure=True also gives the update ratio. None when a signal came between
        micro-batches: the step is undone (gradients dropped, batches and random streams rewound), so a resume
        takes it again exactly."""
        rewind = self._rewind_point() if self.micro_steps > 1 and not self.ctx.distributed else None
        total_loss = torch.zeros((), device=self.device)
        for micro in range(self.micro_steps):
            if rewind is not None and micro and self.interrupt.requested:
                self._rewind(rewind)
                return None
            x, y = self.train_batches.next_batch()
            with dist_util.gradient_sync(self.wrapped, enabled=micro == self.micro_steps - 1):
                with autocast(self.device, self.autocast_dtype):
                    _, loss = self.step_model(x, y)
                    # Summed over this rank's micro-batches, then averaged over ranks by DDP or FSDP2, the
                    # gradients are the mean over all micro-batches of the step.
                    loss = loss / self.micro_steps
                self.train_batches.prefetch()  # host-side gather overlaps the device's forward pass
                self.scaler.scale(loss).backward()
            total_loss += loss.detach()
        grad_norm, param_nonfinite = self.stepper.clip_gradients()
        nonfinite = ~torch.isfinite(grad_norm + total_loss)  # either non-finite makes the sum so
        weight_norm = self.stepper.remember_weights() if measure else None
        self.stepper.step(nonfinite)
        self.health.record_step(nonfinite, param_nonfinite)
        update_ratio = self.stepper.update_norm() / weight_norm if measure else None
        return StepResult(total_loss, grad_norm, update_ratio)

    def _rewind_point(self) -> tuple:
        return self.train_batches.state_dict(), torch.get_rng_state(), _cuda_rng_state(self.device)

    def _rewind(self, point: tuple) -> None:
        sampler_state, cpu_rng, cuda_rng = point
        self.optimizer.zero_grad(set_to_none=True)
        self.train_batches.load_state_dict(sampler_state)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float] | None:
        """Mean loss over eval_iters batches of each split (shared out among the ranks), in eval mode. The
        batches are the same at every evaluation, so successive values differ only by what the model learned.
        None when a signal asked a single process to stop: a long evaluation is abandoned, not finished."""
        # A single process drops the evaluation at the first signal, between two operations; ranks must finish
        # it together (its all-reduce), then agree to stop.
        abandonable = contextlib.nullcontext() if self.ctx.distributed else self.interrupt.abandonable()
        self.model.eval()
        try:
            with abandonable:
                return {split: self._mean_loss(split, stream)
                        for split, stream in (("train", EVAL_TRAIN_STREAM), ("val", EVAL_VAL_STREAM))}
        except Abandoned:
            return None
        finally:
            self.model.train()

    def _mean_loss(self, split: str, stream: int) -> float:
        per_rank = math.ceil(self.config.eval_iters / self.ctx.world_size)
        batches = self._sampler(split, stream)
        total = torch.zeros((), device=self.device)
        for _ in quiet_bar(range(per_rank), desc=f"eval {split}"):
            self.interrupt.check()  # in case library code swallowed the signal's exception
            x, y = batches.next_batch()
            with autocast(self.device, self.autocast_dtype):
                _, loss = self.step_model(x, y)
            total += loss.float()
        return dist_util.all_reduce(total).item() / (per_rank * self.ctx.world_size)

    def evaluate_and_checkpoint(self) -> bool:
        """Evaluate; save ckpt_last.pt (and ckpt_best.pt on a new best) as configured. True when it saved."""
        it = self.progress.iter_num
        losses = self.estimate_loss()
        if losses is None:
            return False
        self.progress.last_eval_iter = it
        self.reporter.message(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self.metrics.write({"iter": it, "train_loss": _finite_or_none(losses["train"]),
                            "val_loss": _finite_or_none(losses["val"])})
        self.health.check_eval(it, losses["train"], losses["val"])
        improved = losses["val"] < self.progress.best_val_loss
        if improved:
            self.progress.best_val_loss, self.progress.best_iter = losses["val"], it
        if it > 0 and not self.config.eval_only and (improved or self.config.always_save_checkpoint):
            if self.save(ckpt_io.LAST) and improved and self.ctx.is_main:
                ckpt_io.link_or_copy(self.out_dir / ckpt_io.LAST, self.out_dir / ckpt_io.BEST)
            return True
        return False

    def _log_step(self, it: int, lr: float, result: StepResult, seconds_per_iter: float) -> None:
        cfg = self.config
        loss = dist_util.all_reduce(result.loss.clone()).item() / self.ctx.world_size
        grad_norm = result.grad_norm.item()
        row = {
            "iter": it,
            "loss": _finite_or_none(loss),
            "lr": lr,
            "grad_norm": _finite_or_none(grad_norm),
            "clipped": cfg.grad_clip > 0 and grad_norm > cfg.grad_clip,
            "ms": seconds_per_iter * 1000,
            "tokens_per_s": cfg.tokens_per_iter / seconds_per_iter,
        }
        if result.update_ratio is not None:
            row["update_ratio"] = _finite_or_none(result.update_ratio.item())
        if self.peak_flops:
            mfu = self.flops_per_token * row["tokens_per_s"] / (self.peak_flops * self.ctx.world_size)
            if mfu <= 1:  # above 1 the peak was not the device's real one: say nothing rather than nonsense
                row["mfu"] = mfu
        self.metrics.write(row)
        self.health.check_logged_step(it, row["grad_norm"], row.get("update_ratio"), warmup=it < cfg.warmup_iters)
        self.reporter.step_logged(_format_step(row), loss, row["tokens_per_s"])

    def warn(self, it: int, kind: str, message: str) -> None:
        """A health warning: to stderr and metrics.jsonl, at most one of each kind per eval interval."""
        if self.limiter.allow(it, kind):
            self.reporter.message(f"warning: {message}", file=sys.stderr)
            self.metrics.write({"iter": it, "event": kind, "message": message})

    # ----- checkpoints --------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict | None:
        """The state to save, gathered in full onto rank 0 (a collective: every rank calls it). Optimizer
        state is keyed by parameter name, so it loads at any world size, sharded or not."""
        model_state = get_model_state_dict(self.model, options=FULL_STATE)
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=FULL_STATE)
        ranks = dist_util.all_gather_objects({"rng": rng_state(), "sampler": self.train_batches.state_dict()})
        if not self.ctx.is_main:
            return None
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "model_config": asdict(self.model.config),
            "train_config": config_to_dict(self.config),
            "dataset_meta": self.dataset_meta,
            "progress": asdict(self.progress),
            "world_size": self.ctx.world_size,
            "metrics_length": self.metrics.length,  # a resume cuts metrics.jsonl back to this
            "rng": ranks[0]["rng"],
            "sampler": ranks[0]["sampler"],
            "ranks": ranks if self.ctx.distributed else None,
        }

    def save(self, name: str) -> bool:
        """Write a checkpoint atomically; False (and a warning) instead of saving non-finite weights."""
        it = self.progress.iter_num
        if not self.stepper.weights_finite():
            self.warn(it, "nonfinite_weights", f"weights are not finite at iter {it}: {name} was not written, so "
                                               "the last good checkpoint stays")
            return False
        state = self.checkpoint_state()
        path = self.out_dir / name
        if state is not None:
            try:
                ckpt_io.save_checkpoint(state, path)
            except OSError as exc:
                previous = ("the previous checkpoint is intact; free disk space (or fix the folder), then "
                            f"{self.resume_advice()}" if self.checkpoint_iter is not None
                            else "no checkpoint was written before; free disk space (or fix the folder) and start "
                                 "again")
                raise CheckpointWriteError(f"error: could not write {path} ({exc.strerror or exc}); {previous}") \
                    from None
        if name == ckpt_io.LAST:
            self._last_saved_iter = self.checkpoint_iter = it
        return True

    def _start_row(self) -> dict:
        return {
            "iter": self.progress.iter_num,
            "event": "start",
            "vocab_size": self.model.config.vocab_size,
            "n_params": self.model.num_params(),
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops * self.ctx.world_size if self.peak_flops else None,
            "device": device_name(self.device),
            "device_type": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "compiled": self.compiled,
            "tokens_per_iter": self.config.tokens_per_iter,
            "world_size": self.ctx.world_size,
        }

    def _print_summary(self) -> None:
        cfg = self.config
        peak = f"; peak {self.peak_flops / 1e12:.3g} TFLOP/s" if self.peak_flops else ""
        parallel = f"; {self.ctx.world_size} processes ({cfg.parallel})" if self.ctx.distributed else ""
        print(
            f"model: {self.model.num_params() / 1e6:.2f}M parameters "
            f"({self.model.num_params(non_embedding=True) / 1e6:.2f}M without position embeddings); "
            f"device {self.device}, {str(self.dtype).removeprefix('torch.')}"
            f"{', compiled' if self.compiled else ''}; {cfg.tokens_per_iter:,} tokens per iteration{peak}{parallel}"
        )


def load_pretrained(source: Path) -> dict:
    from gptrain.tools import hf

    if hf.is_hf_folder(source) or (source.is_dir() and (source / "config.json").exists()):
        config = hf.read_hf_config(source)
        return {"model": hf.hf_to_gptrain(hf.read_hf_weights(source), config), "model_config": asdict(config)}
    return ckpt_io.load_checkpoint(ckpt_io.find_checkpoint(source))


def _cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _signal_label(signum: int) -> str:
    return {2: "SIGINT (Ctrl-C)", 15: "SIGTERM"}.get(signum, f"signal {signum}")


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: non-finite figures are written as null."""
    return value if math.isfinite(value) else None


def _format_step(row: dict) -> str:
    def fmt(value, spec):
        return "nan" if value is None else format(value, spec)

    update = f"update {fmt(row['update_ratio'], '.1e')}, " if "update_ratio" in row else ""
    line = (f"iter {row['iter']}: loss {fmt(row['loss'], '.4f')}, lr {row['lr']:.2e}, "
            f"grad norm {fmt(row['grad_norm'], '.3f')}{' (clipped)' if row['clipped'] else ''}, "
            f"{update}time {row['ms']:.1f}ms, {row['tokens_per_s']:,.0f} tok/s")
    if "mfu" in row:
        line += f", mfu {row['mfu'] * 100:.1f}%"
    return line


def train(config: TrainConfig, overwrite: bool = False) -> Trainer:
    """Train in this process, or as one rank of a torchrun job when its environment variables are set. Rank 0
    holds out_dir's lock for the whole run."""
    ctx = dist_util.context_from_env()
    device = dist_util.process_device(ctx, resolve_device(config.device))
    dist_util.validate(ctx, config.gradient_accumulation_steps, config.parallel, resolve_dtype(config.dtype, device))
    claim = outdir.claimed(Path(config.out_dir), "out_dir") if ctx.is_main else contextlib.nullcontext()
    with dist_util.process_group(ctx, device), claim, out_of_memory_as_user_error():
        if ctx.is_main:
            check_run_folder(config, overwrite)
        trainer = Trainer(config, overwrite, ctx)
        try:
            trainer.run()
        finally:
            if ctx.distributed:
                trainer.release()
    return trainer


def check_run_folder(config: TrainConfig, overwrite: bool) -> None:
    """A new run does not start over another run's files (nanoGPT silently overwrites them), and --overwrite
    never deletes what the run itself reads."""
    out_dir = Path(config.out_dir)
    if config.init_from == "resume":
        if overwrite:
            raise UserError("--overwrite starts over, init_from: resume continues: drop one of them")
        outdir.refuse_folders_in_the_way(out_dir)
        return
    resumable = "run" in outdir.holdings(out_dir)
    outdir.refuse_unless_overwrite(out_dir, overwrite,
                                   advice="continue it with --init_from=resume, " if resumable else "")
    if not overwrite or not out_dir.is_dir():
        return
    for what, path in _inputs(config):
        if path is not None and _is_within(path, out_dir):
            raise UserError(f"{what} {path} lies in out_dir {out_dir}, which --overwrite would clear; "
                            "choose another out_dir")


def _inputs(config: TrainConfig) -> list[tuple[str, Path | None]]:
    dataset = Path(config.dataset) if Path(config.dataset).exists() else Path("data") / config.dataset
    source = Path(config.init_from[len("from:"):]) if config.init_from.startswith("from:") else None
    return [("the dataset", dataset), ("init_from", source)]


def _is_within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


@contextlib.contextmanager
def out_of_memory_as_user_error():
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise UserError(_out_of_memory(exc)) from None
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc).lower():
            raise
        raise UserError(_out_of_memory(exc)) from None


def _out_of_memory(exc: BaseException) -> str:
    return (f"out of memory ({one_line(exc, 120)}); lower batch_size or block_size (keep the tokens per step with "
            "gradient_accumulation_steps), or train a smaller model; checkpoints already written are intact")
