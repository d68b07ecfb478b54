"""The training loop: set up, then for each iteration evaluate when due, set the LR, step, log.

One process, or one of several under torchrun: then rank 0 alone prints, writes metrics.jsonl and checkpoints,
and every rank takes part in the collectives (gradient reduction, evaluation, saving). The step itself is
`Trainer.train_step`, in the order every tutorial teaches it.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import asdict, dataclass

import torch

from gptrain import build
from gptrain import checkpoint as ckpt_io
from gptrain.config import TrainConfig, config_to_dict
from gptrain.data.chat_batches import ChatBatchSampler
from gptrain.data.dataset import BatchSampler
from gptrain.data.order import EpochSampler
from gptrain.errors import Interrupted, UserError, one_line
from gptrain.evaluate import Evaluator
from gptrain.exact_match import held_out_questions
from gptrain.loop_state import LoopState
from gptrain.monitor.metrics import MetricsLog
from gptrain.monitor.report import RunReport
from gptrain.monitor.run_info import RunInfo
from gptrain.monitor.trackers import Trackers
from gptrain.optim.step import UpdateRatio, grad_norms, needs_clipping, skipping_nonfinite, weights_finite
from gptrain.runtime import distributed as dist_util
from gptrain.runtime.background_save import host_copy, tensors_in
from gptrain.runtime.device import (
    autocast,
    cache_graphs_with_autocast,
    compiles_per_block,
    grad_scaler,
    out_of_memory_as_user_error,
    resolve_compile,
)
from gptrain.runtime.rng import DROPOUT_STREAM, RankStreams, stream_seed
from gptrain.runtime.signals import GracefulInterrupt


@dataclass
class StepResult:
    """One optimizer step's figures, still on the device: reading them is the caller's (one) sync."""

    loss: torch.Tensor  # mean loss over the micro-batches
    grad_norm: torch.Tensor  # global gradient norm before clipping
    update_ratio: torch.Tensor | None  # ||delta w|| / ||w|| over all weights, when measured
    pair_sums: torch.Tensor | None = None  # objective: dpo: this rank's figures summed over the step's pairs
    positions: int | None = None  # objective: dpo: the positions this rank's padded pair batches held (a host count)


class Trainer:
    def __init__(self, config: TrainConfig, overwrite: bool = False, placement: build.Placement | None = None):
        """Builds everything and checks every input before run() writes anything into out_dir."""
        self.config, self.overwrite = config, overwrite
        placement = placement or build.place(config)
        self.ctx, self.device, self.dtype = placement.ctx, placement.device, placement.dtype
        self.accumulation_steps = config.gradient_accumulation_steps // self.ctx.world_size  # this rank's share
        self.run_dir = config.run_dir
        self.dataset = build.open_dataset(config)
        # Chat losses are sums over the answer tokens, divided by the step's token count (loss_divisor).
        self.loss_reduction = "mean" if self.dataset.chat is None else "sum"
        resume = build.load_resume_checkpoint(config, self.dataset, self.ctx.is_main) \
            if config.init_from == "resume" else None
        self.lora = build.lora_run(config, self.dataset, resume)  # None unless LoRA
        self.model = build.build_model(config, self.dataset, self.device, resume, self.ctx.is_main, self.lora)
        self.dpo = build.dpo_objective(config, self.dataset, self.model, placement, resume, self.lora)
        if self.ctx.distributed:
            torch.manual_seed(stream_seed(config.seed, DROPOUT_STREAM, self.ctx.rank))  # dropout differs by rank
        self.compiled = resolve_compile(config.compile, self.device)
        if self.compiled:
            cache_graphs_with_autocast()
        fsdp = self.ctx.distributed and config.parallel == "fsdp"
        per_block = self.compiled and compiles_per_block(self.device, fsdp)
        self.wrapped = dist_util.wrap_model(self.model, config.parallel, self.ctx, self.device, self.dtype,
                                            compile_blocks=per_block)
        self.sharded = dist_util.uses_fsdp(self.model)
        self.autocast_dtype = torch.float32 if self.sharded else self.dtype  # FSDP2 casts the parameters itself
        self.optimizer = build.build_optimizer(self.model, config, self.dtype, self.device)
        # batch_size: auto becomes a number here, in the config itself, before anything reads it
        self.batch_choice = build.settle_batch_size(config, placement, self.dataset, self.model, self.optimizer,
                                                    resume) if config.batch_size == "auto" else None
        self.accumulation_steps = config.gradient_accumulation_steps // self.ctx.world_size
        self.schedule = build.lr_schedule(config)
        self.scaler = grad_scaler(self.device, self.dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # On a CPU reading a value costs no synchronisation: clipping and skipping are decided on the host there.
        self.host_decides = self.device.type == "cpu"
        self.update_ratio = UpdateRatio(self.params, self.sharded, config.update_ratio_interval)
        self.loop = LoopState()
        self.streams = RankStreams(self.ctx, self.device, config.seed, lambda *more: self.make_sampler("train", *more))
        self.checkpoints = ckpt_io.RunCheckpoints(self.run_dir)
        self.resume_metrics_length, self.tracker_ids, self.trackers = None, {}, Trackers([])
        if resume is not None:
            self._restore(resume)
        # Compiled last, when whole; checkpoints come from self.model, so they never carry `_orig_mod.` or `module.`.
        # Evaluation runs the same compiled model: its eval-mode graph is compiled once and cached beside the
        # training graph, so no evaluation recompiles.
        self.step_model = torch.compile(self.wrapped) if self.compiled and not per_block else self.wrapped
        self.interrupt = GracefulInterrupt()
        self.evaluator = self.make_evaluator()
        self.info = RunInfo.of(self.model, config, self.ctx, self.device, self.dtype, self.compiled)
        self.report = RunReport(config, self.info, self.ctx, self.model, self.checkpoints.resume_advice)
        self.health = self.report.health  # the step records non-finite steps on the device; the report reads them

    @property
    def train_batches(self) -> BatchSampler | EpochSampler:
        return self.streams.sampler

    @train_batches.setter
    def train_batches(self, sampler) -> None:
        self.streams.sampler = sampler

    def make_sampler(self, split: str, stream: int, *more: int) -> BatchSampler | EpochSampler | ChatBatchSampler:
        """A fresh sampler of a split's batches for one random stream (build.make_sampler says which kind)."""
        return build.make_sampler(self.config, self.dataset, self.ctx, self.device, self.accumulation_steps, split,
                                  stream, *more)

    def make_evaluator(self) -> Evaluator:
        """The loss estimate; on a chat dataset over the counted tokens, with held-out questions for exact match
        (with DPO: over the pairs, the questions answered as the chosen answers are)."""
        cfg, chat, pairs = self.config, self.dataset.chat, self.dpo is not None
        questions = held_out_questions(chat["val"], cfg.chat_eval_answers, cfg.block_size, step=2 if pairs else 1) \
            if chat else []
        return Evaluator(self.model, self.step_model, self.make_sampler, self.ctx, cfg.eval_iters,
                         self.autocast_dtype, self.interrupt, token_weighted=chat is not None and not pairs,
                         questions=questions, dpo=self.dpo)

    def _restore(self, state: dict) -> None:
        """Everything but the weights (loaded before wrapping): optimizer, scaler, loop state, random streams."""
        path = self.run_dir.last
        try:
            ckpt_io.restore_parts(self.stateful_parts(), state)
            note = self.streams.load_state_dict(state, self.loop.iter_num)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            raise UserError(f"{path} cannot be resumed: its training state is damaged or from another version "
                            f"({one_line(exc)}); fine-tune from its weights with init_from: from:{path}") from None
        it = self.checkpoints.last_iter = self.loop.iter_num
        self.resume_metrics_length = state["metrics_length"]
        self.tracker_ids = Trackers.saved_ids(state.get("trackers"))  # a resumed run continues its W&B run
        self.loop.check_resumable(self.config, path, self.run_dir.best)
        if self.ctx.is_main:
            print(f"resuming from {path} at iter {it}{note}")

    # ----- the loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        metrics = None
        if self.ctx.is_main:
            build.prepare_run_folder(self.config, self.overwrite, self.resume_metrics_length, self.loop.iter_num)
            self.trackers = Trackers.start(self.config, self.checkpoints.last_iter, self.tracker_ids.get("wandb"))
            metrics = MetricsLog(self.run_dir.metrics, copies=self.trackers)
        dist_util.barrier()
        self.report.open(metrics, self.loop.iter_num)
        try:
            with self.interrupt, self.report.metrics:
                self.report.start(self.loop.iter_num)
                self._loop()
                if not self.config.eval_only and self.checkpoints.last_iter != self.loop.iter_num:
                    self.save()
                self.checkpoints.wait()  # the run ends when its last checkpoint is on disk
        except BaseException as exc:
            # A second signal aborts at once (the write in flight is abandoned, the previous file stays whole);
            # any other failure lets the write in flight land first.
            self.checkpoints.settle(abandon=isinstance(exc, (Interrupted, KeyboardInterrupt)))
            raise
        finally:
            self.report.console.close()

    def _loop(self) -> None:
        cfg = self.config
        clock, iters_since_log, start_iter = time.perf_counter(), 0, self.loop.iter_num
        positions_since_log = 0  # objective: dpo: its steps' sizes vary with their pairs' lengths
        train_seconds = 0.0  # wall time of the steps alone, evaluations and checkpoints excluded
        while True:
            it = self.loop.iter_num
            saved = False
            if self._eval_due(it):
                train_seconds += time.perf_counter() - clock
                saved = self.evaluate_and_checkpoint()
                clock, iters_since_log, positions_since_log = time.perf_counter(), 0, 0
                if self.interrupt.requested and not self.ctx.distributed:
                    self._stop_for_signal()
                if self.loop.out_of_patience(self.config, it):
                    self._stop_early(saved)
                    break
            if cfg.checkpoint_interval and it % cfg.checkpoint_interval == 0 and it > start_iter and not saved:
                self.save()
            if cfg.eval_only or it >= cfg.max_iters:
                break
            log_now = it % cfg.log_interval == 0 or it == cfg.max_iters - 1
            lr, result = self.run_iteration(it, measure_update=log_now and self.update_ratio.due(it))
            iters_since_log += 1
            positions_since_log += result.positions or 0
            if log_now:  # the host reads the device only here: between logged steps nothing waits for it
                now = time.perf_counter()
                epoch = self.train_batches.epochs_done if cfg.data_order == "epochs" else None
                self.report.step(it, lr, result, (now - clock) / iters_since_log, epoch,
                                 positions_since_log / iters_since_log if result.positions is not None else None)
                train_seconds += now - clock
                clock, iters_since_log, positions_since_log = now, 0, 0
            if self._should_stop(host_reads_now=log_now):
                self._stop_for_signal()
        self.checkpoints.wait()  # ckpt_best.pt, which the line below looks for, may still be being published
        done = self.loop.iter_num - start_iter
        pace = f" in {train_seconds:.1f}s of training ({train_seconds / done * 1000:.1f} ms/iter)" if done else ""
        best = self.loop.best_model_note(self.run_dir.best)
        self.report.console.message(f"done: {done} iterations{pace}; {best}")

    def run_iteration(self, it: int, measure_update: bool = False) -> tuple[float, StepResult]:
        """One iteration as the loop runs it: the learning rate, the step, the count. bench times exactly this."""
        lr = self.set_lr(it)
        result = self.train_step(measure_update)
        if result is None:  # a signal came between micro-batches: the step was undone
            self._stop_for_signal()
        self.loop.iter_num += 1
        self.report.console.advance()
        return lr, result

    def set_lr(self, it: int) -> float:
        """Set every group's rate for iteration `it`; returns the rate of learning_rate's groups (logged)."""
        factor = self.schedule.factor(it)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.config.learning_rate * factor

    def train_step(self, measure_update: bool = False) -> StepResult | None:
        """One optimizer step over this rank's share of the micro-batches; gradients are reduced across ranks once,
        on the last. A non-finite step leaves the weights as they were. None when a signal came between
        micro-batches: the step is undone (gradients dropped, batches and random streams rewound) for an exact
        resume."""
        undo = self.streams.undo_point() if self.accumulation_steps > 1 and not self.ctx.distributed else None
        total_loss, pair_sums, positions = torch.zeros((), device=self.device), None, 0
        divisor = self.loss_divisor()
        for micro in range(self.accumulation_steps):
            if micro and self.undone_for_a_signal(undo):
                return None
            batch = self.train_batches.next_batch()  # (x, y), and each token's position in its conversation for chat
            with self.gradient_sync(last=micro == self.accumulation_steps - 1):
                with autocast(self.device, self.autocast_dtype):
                    loss, sums = self.micro_batch_loss(batch)
                    loss = loss / divisor  # the accumulated gradients are then the step's mean
                self.train_batches.prefetch()  # host-side gather overlaps the device's forward pass
                self.scaler.scale(loss).backward()
            total_loss += loss.detach()
            if sums is not None:
                pair_sums = sums if pair_sums is None else pair_sums + sums
                positions += batch.x.numel()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not float16-scaled ones
        grad_norm, bad_params = grad_norms(self.params, self.sharded)
        if needs_clipping(grad_norm, self.config.grad_clip, self.host_decides):
            torch.nn.utils.clip_grads_with_norm_(self.params, self.config.grad_clip, grad_norm)
        nonfinite = ~torch.isfinite(grad_norm + total_loss)  # either non-finite makes the sum so
        if measure_update:
            self.update_ratio.remember_weights()
        with skipping_nonfinite(self.optimizer, self.scaler, nonfinite, self.host_decides) as skip:
            if not skip:
                self.scaler.step(self.optimizer)  # optimizer.step(), unscaled
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.health.record_step(nonfinite, bad_params)
        return StepResult(total_loss, grad_norm, self.update_ratio.measure() if measure_update else None, pair_sums,
                          positions if pair_sums is not None else None)

    def micro_batch_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One micro-batch's loss, and with objective: dpo the figures summed over its pairs (else None)."""
        if self.dpo is not None:
            return self.dpo.batch_loss(self.step_model, batch)
        return self.step_model(*batch, loss_reduction=self.loss_reduction)[1], None

    def undone_for_a_signal(self, undo) -> bool:
        """Between two micro-batches: when a signal came, drop the step's gradients and rewind the batches and random
        streams to the step's start (`undo`), so a resume takes the step again exactly; True then. A step under
        torchrun, or of one micro-batch, runs to its end (undo is None)."""
        if undo is None or not self.interrupt.requested:
            return False
        self.optimizer.zero_grad(set_to_none=True)
        self.streams.undo(undo)
        return True

    def gradient_sync(self, last: bool):
        """Gradients are reduced across ranks on the step's last micro-batch only (a no-op in one process)."""
        return dist_util.gradient_sync(self.wrapped, enabled=last)

    def loss_divisor(self) -> int | torch.Tensor:
        """What each micro-batch's loss is divided by so that the step's gradient is a mean. Plain data: the number
        of micro-batches, each loss being the mean over its tokens. Chat data, whose losses are sums: the tokens
        the loss counts in the whole step on every rank (one all-reduce), so short and long answers weigh by their
        tokens wherever they fall; that count over the world size, as DDP and FSDP then average the ranks'
        gradients. DPO: the number of micro-batches, each loss being the mean over its pairs (every micro-batch holds
        batch_size of them), so every pair of the step weighs alike on every rank."""
        if self.dataset.chat is None or self.dpo is not None:
            return self.accumulation_steps
        counted = dist_util.all_reduce(self.train_batches.counted_targets(self.accumulation_steps).float())
        return counted.clamp(min=1.0) / self.ctx.world_size

    def evaluate_and_checkpoint(self) -> bool:
        """Evaluate; save ckpt_last.pt (and ckpt_best.pt on a new best) as configured. True when it saved."""
        it = self.loop.iter_num
        losses = self.evaluator.estimate_loss()
        if losses is None:
            return False
        self.loop.last_eval_iter = it
        self.report.evaluation(it, losses)
        improved = self.loop.record_eval(it, losses["val"])
        if it > 0 and not self.config.eval_only and (improved or self.config.always_save_checkpoint):
            self.save(best=improved)  # the writer publishes ckpt_best.pt once ckpt_last.pt is written
            return True
        return False

    def _eval_due(self, it: int) -> bool:
        if self.config.eval_only:
            return True
        due = it % self.config.eval_interval == 0 or it == self.config.max_iters
        return due and self.loop.last_eval_iter != it  # a resumed run does not repeat its last eval

    # ----- stopping -----------------------------------------------------------------------------------

    def _should_stop(self, host_reads_now: bool) -> bool:
        """A single process checks after every step. Ranks must agree on the step they stop after, so they vote
        (one all-reduce) only where they read from the device anyway."""
        if not self.ctx.distributed:
            return self.interrupt.requested
        if not host_reads_now:
            return False
        vote = torch.tensor(float(self.interrupt.requested), device=self.device)
        return dist_util.all_reduce(vote, torch.distributed.ReduceOp.MAX).item() > 0

    def _stop_for_signal(self) -> None:
        """The loop stands between two steps: save where it stands (waiting for the write) and say how to
        continue."""
        saved = not self.config.eval_only and self.save()
        self.checkpoints.wait()
        signum = self.interrupt.signum or 15  # a rank that got no signal itself stops with its peers
        what = f"saved {self.run_dir.last}; " if saved else "nothing was saved; "
        raise Interrupted(signum, f"interrupted by {_signal_label(signum)} at iter {self.loop.iter_num}: {what}"
                                  f"{self.checkpoints.resume_advice()}")

    def _stop_early(self, saved: bool) -> None:
        """ckpt_last.pt holds where the run stopped (a resume is told why it would stop again) and ckpt_best.pt the
        best model. The event row comes after the checkpoint's metrics length, so a resume that raises
        early_stop_evals cuts it back with the rest."""
        it = self.loop.iter_num
        if not saved:
            self.save()
        self.checkpoints.wait()  # the reason names ckpt_best.pt only once it exists
        self.report.early_stop(it, self.loop, self.loop.early_stop_reason(self.config, self.run_dir.best))

    # ----- checkpoints --------------------------------------------------------------------------------

    def stateful_parts(self) -> dict:
        """The parts that save and restore their own state, by their name in the checkpoint."""
        return {"optimizer": dist_util.OptimizerState(self.model, self.optimizer),
                "scaler": ckpt_io.ScalerState(self.scaler), "progress": self.loop}

    def checkpoint_state(self) -> dict | None:
        """The state to save, gathered in full onto rank 0 (collectives: every rank calls it), as a host copy of
        its own: training goes on changing the weights and optimizer state in place while a thread writes it."""
        weights = dist_util.full_model_state(self.model)
        parts = ckpt_io.capture_parts(self.stateful_parts())
        streams = self.streams.state_dict()
        if not self.ctx.is_main:
            return None
        lora = {"lora": self.lora.entry()} if self.lora else {}  # then the weights are only the adapters
        state = {"model": self.lora.adapter_weights(weights, self.model) if self.lora else weights, **lora,
                 **parts, **streams, **(self.dpo.checkpoint_entry() if self.dpo else {}),  # its stored reference
                 "model_config": asdict(self.model.config),
                 "train_config": config_to_dict(self.config), "dataset_meta": self.dataset.meta,
                 "metrics_length": self.report.metrics.length,  # a resume cuts metrics.jsonl back to this
                 "trackers": self.trackers.ids()}
        return host_copy(state, self.live_tensors())

    def live_tensors(self):
        """The tensors training changes in place: a checkpoint's state must not share memory with them."""
        yield from self.model.parameters()
        yield from self.model.buffers()
        yield from tensors_in(list(self.optimizer.state.values()))

    def save(self, best: bool = False) -> bool:
        """Once the write in flight has ended: copy the state to host memory now, and write ckpt_last.pt
        atomically in the background (and publish it as ckpt_best.pt with best); False (and a warning) instead of
        saving non-finite weights."""
        it = self.loop.iter_num
        self.checkpoints.wait()  # one write at a time; its error ends the run here
        if not weights_finite(self.params, self.sharded):
            self.report.warn(it, "nonfinite_weights", f"weights are not finite at iter {it}: {self.run_dir.last.name} "
                                                      "was not written, so the last good checkpoint stays")
            return False
        self.checkpoints.write_in_background(self.checkpoint_state(), it, best)
        return True

    def release(self) -> None:
        """Drop the model, optimizer and wrappers while the process group still exists. Collective work that DDP
        or FSDP2 keep referenced would otherwise be destroyed at interpreter shutdown, which can abort the process
        (seen with gloo)."""
        for name in ("step_model", "wrapped", "model", "optimizer", "params", "update_ratio"):
            self.__dict__.pop(name, None)
        gc.collect()


def _signal_label(signum: int) -> str:
    return {2: "SIGINT (Ctrl-C)", 15: "SIGTERM"}.get(signum, f"signal {signum}")


def train(config: TrainConfig, overwrite: bool = False) -> Trainer:
    """Train in this process, or as one rank of a torchrun job when its environment variables are set. Rank 0
    holds out_dir's lock for the whole run."""
    placement = build.place(config)
    claim = config.run_dir.claimed() if placement.ctx.is_main else contextlib.nullcontext()
    with dist_util.process_group(placement.ctx, placement.device), claim, out_of_memory_as_user_error():
        if placement.ctx.is_main:
            build.check_run_folder(config, overwrite)
        trainer = Trainer(config, overwrite, placement)
        try:
            trainer.run()
        finally:
            if placement.ctx.distributed:
                trainer.release()
    return trainer
