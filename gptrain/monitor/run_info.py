"""What a run is, said once: the first printed line, the first metrics.jsonl record ("start") and the MFU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gptrain.config import TrainConfig
from gptrain.monitor.cpu_load import too_busy
from gptrain.monitor.flops import device_name, device_peak, model_flops_per_token
from gptrain.runtime.distributed import DistContext


@dataclass
class RunInfo:
    n_params: int
    n_params_non_embedding: int
    n_trainable: int  # the parameters the optimizer updates: fewer than n_params under LoRA
    lora: bool
    vocab_size: int
    flops_per_token: int
    peak_flops: float | None  # one device's, FLOP/s; None where unknown
    peak_busy: float | None  # a CPU's probe: the share of the machine other processes used meanwhile; else None
    threads: int  # this process's CPU threads (torch.get_num_threads())
    cpus: int  # the machine's
    device: torch.device
    dtype: torch.dtype
    compiled: bool
    tokens_per_iter: int
    world_size: int
    parallel: str
    pairs_per_iter: int | None  # objective: dpo: a step's preference pairs, whose padded lengths vary

    @classmethod
    def of(cls, model, config: TrainConfig, ctx: DistContext, device: torch.device, dtype: torch.dtype,
           compiled: bool) -> RunInfo:
        # torchrun's ranks on one CPU probe side by side, as they then train: waiting for a quiet moment would
        # wait for each other.
        peak = device_peak(device, dtype, wait_for_quiet=not ctx.distributed)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return cls(model.num_params(), model.num_params(non_embedding=True), trainable, config.lora_rank > 0,
                   model.config.vocab_size, model_flops_per_token(model, config.block_size), peak.flops, peak.busy,
                   torch.get_num_threads(), os.cpu_count() or 1, device, dtype, compiled, config.tokens_per_iter,
                   ctx.world_size, config.parallel,
                   config.gradient_accumulation_steps * config.batch_size if config.objective == "dpo" else None)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def peak_probed_busy(self) -> bool:
        """The CPU's probe found no quiet moment: other work slowed it, so the peak may be low and MFU high."""
        return self.peak_busy is not None and too_busy(self.peak_busy, self.cpus, self.threads)

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation; None when the peak is unknown, or when above 1 (then the peak was not the
        device's real one, and a figure would mislead)."""
        if not self.peak_flops:
            return None
        mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size)
        return mfu if mfu <= 1 else None

    def start_row(self, it: int) -> dict:
        peak = self.peak_flops * self.world_size if self.peak_flops else None
        busy = round(self.peak_busy, 3) if self.peak_busy is not None else None
        return {"iter": it, "event": "start", "vocab_size": self.vocab_size, "n_params": self.n_params,
                "n_trainable": self.n_trainable, "flops_per_token": self.flops_per_token, "peak_flops": peak,
                "peak_busy": busy, "threads": self.threads, "cpus": self.cpus, "device": device_name(self.device),
                "device_type": self.device.type, "dtype": self.dtype_name, "compiled": self.compiled,
                "tokens_per_iter": self.tokens_per_iter, "world_size": self.world_size}

    def summary(self) -> str:
        parallel = f"; {self.world_size} processes ({self.parallel})" if self.world_size > 1 else ""
        return (f"model: {self.n_params / 1e6:.2f}M parameters ({self.n_params_non_embedding / 1e6:.2f}M without "
                f"position embeddings){self._trained()}; device {self.device}, {self.dtype_name}"
                f"{', compiled' if self.compiled else ''}; {self._step_size()}{self._peak()}{parallel}")

    def _step_size(self) -> str:
        if self.pairs_per_iter is None:
            return f"{self.tokens_per_iter:,} tokens per iteration"
        return (f"{self.pairs_per_iter:,} preference pairs per iteration (tokens/s counts the positions of their "
                "sequences, padded to each micro-batch's longest)")

    def _trained(self) -> str:
        if self.n_trainable == self.n_params:
            return ""
        return f", {self.n_trainable:,} trained{' (LoRA)' if self.lora else ''}"

    def _peak(self) -> str:
        if not self.peak_flops:
            return ""
        busy = (f", probed while other processes used {self.peak_busy:.0%} of the {self.cpus} CPUs (no quiet moment "
                f"for its {self.threads} threads), so MFU may read high") if self.peak_probed_busy else ""
        return f"; peak {self.peak_flops / 1e12:.3g} TFLOP/s{busy}"
