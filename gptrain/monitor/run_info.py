"""What a run is, said once: the first printed line, the first metrics.jsonl record ("start") and the MFU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptrain.config import TrainConfig
from gptrain.monitor.flops import device_name, model_flops_per_token, peak_flops
from gptrain.runtime.distributed import DistContext


@dataclass
class RunInfo:
    n_params: int
    n_params_non_embedding: int
    vocab_size: int
    flops_per_token: int
    peak_flops: float | None  # one device's, FLOP/s; None where unknown
    device: torch.device
    dtype: torch.dtype
    compiled: bool
    tokens_per_iter: int
    world_size: int
    parallel: str

    @classmethod
    def of(cls, model, config: TrainConfig, ctx: DistContext, device: torch.device, dtype: torch.dtype,
           compiled: bool) -> RunInfo:
        return cls(model.num_params(), model.num_params(non_embedding=True), model.config.vocab_size,
                   model_flops_per_token(model, config.block_size), peak_flops(device, dtype), device, dtype,
                   compiled, config.tokens_per_iter, ctx.world_size, config.parallel)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation; None when the peak is unknown, or when above 1 (then the peak was not the
        device's real one, and a figure would mislead)."""
        if not self.peak_flops:
            return None
        mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size)
        return mfu if mfu <= 1 else None

    def start_row(self, it: int) -> dict:
        peak = self.peak_flops * self.world_size if self.peak_flops else None
        return {"iter": it, "event": "start", "vocab_size": self.vocab_size, "n_params": self.n_params,
                "flops_per_token": self.flops_per_token, "peak_flops": peak, "device": device_name(self.device),
                "device_type": self.device.type, "dtype": self.dtype_name, "compiled": self.compiled,
                "tokens_per_iter": self.tokens_per_iter, "world_size": self.world_size}

    def summary(self) -> str:
        peak = f"; peak {self.peak_flops / 1e12:.3g} TFLOP/s" if self.peak_flops else ""
        parallel = f"; {self.world_size} processes ({self.parallel})" if self.world_size > 1 else ""
        return (f"model: {self.n_params / 1e6:.2f}M parameters ({self.n_params_non_embedding / 1e6:.2f}M without "
                f"position embeddings); device {self.device}, {self.dtype_name}{', compiled' if self.compiled else ''}"
                f"; {self.tokens_per_iter:,} tokens per iteration{peak}{parallel}")
