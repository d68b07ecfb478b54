"""`gptrain grads`: one forward/backward pass, then per-parameter gradient statistics, with problems flagged.

This is the `debug_training.py` of the tutorials, built in: a zero gradient means a parameter is cut off
from the loss, a non-finite one means the computation overflowed, and a tensor whose gradient is large
relative to its weights (far above the median ratio) will be rewritten faster than the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import asdict, dataclass, field

import torch

from gptrain import build
from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.config import AUTO, TrainConfig, build_config, parse_overrides
from gptrain.data.dataset import BatchSampler
from gptrain.errors import UserError
from gptrain.model import GPT, check_fits_in_memory
from gptrain.monitor.metrics import finite_or_none
from gptrain.runtime.device import autocast, resolve_device, resolve_dtype

OUTLIER_FACTOR = 20.0  # grad/param ratio this many times the median flags a tensor (c_proj starts near 15x)


@dataclass
class GradRow:
    name: str
    shape: list[int]
    grad_mean: float
    grad_std: float
    grad_max_abs: float
    param_norm: float
    grad_norm: float
    ratio: float | None  # grad norm / param norm; None for an all-zero parameter (a fresh bias)
    flags: list[str] = field(default_factory=list)


def gradient_rows(model: torch.nn.Module) -> list[GradRow]:
    rows = []
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        p, grad = _real_vocab_rows(model, p), _real_vocab_rows(model, grad)
        g = grad.detach().float()
        param_norm = p.detach().float().norm().item()
        grad_norm = g.norm().item()
        rows.append(GradRow(
            name=name,
            shape=list(p.shape),
            grad_mean=g.mean().item(),
            grad_std=g.std().item() if g.numel() > 1 else 0.0,
            grad_max_abs=g.abs().max().item(),
            param_norm=param_norm,
            grad_norm=grad_norm,
            ratio=grad_norm / param_norm if param_norm > 0 else None,
        ))
    _flag(rows)
    return rows


def _real_vocab_rows(model, tensor: torch.Tensor) -> torch.Tensor:
    """The embedding's and head's rows for real tokens: padding rows are zeros that would dilute the figures."""
    config = model.config
    if tensor.dim() == 2 and tensor.shape[0] == config.padded_vocab_size != config.vocab_size:
        return tensor[: config.vocab_size]
    return tensor


def _flag(rows: list[GradRow]) -> None:
    finite_ratios = [r.ratio for r in rows if r.ratio is not None and math.isfinite(r.ratio) and r.ratio > 0]
    median = statistics.median(finite_ratios) if finite_ratios else 0.0
    for row in rows:
        if not math.isfinite(row.grad_norm):
            row.flags.append("non-finite")
        elif row.grad_max_abs == 0:
            row.flags.append("zero")
        elif median > 0 and row.ratio is not None and row.ratio > OUTLIER_FACTOR * median:
            row.flags.append(f"outlier ({row.ratio / median:.0f}x median)")


def global_norm(rows: list[GradRow]) -> float:
    return math.sqrt(sum(r.grad_norm**2 for r in rows))


def render_table(rows: list[GradRow]) -> str:
    name_width = max(len("parameter"), *(len(r.name) for r in rows))
    header = (f"{'parameter':<{name_width}}  {'shape':<14} {'grad mean':>10} {'grad std':>10} {'max |grad|':>10} "
              f"{'param norm':>10} {'grad/param':>10}  flags")
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        ratio = "-" if r.ratio is None else f"{r.ratio:.2e}"
        lines.append(f"{r.name:<{name_width}}  {shape:<14} {r.grad_mean:>10.2e} {r.grad_std:>10.2e} "
                     f"{r.grad_max_abs:>10.2e} {r.param_norm:>10.3f} {ratio:>10}  {', '.join(r.flags)}".rstrip())
    lines.append("-" * len(header))
    flagged = sum(1 for r in rows if r.flags)
    lines.append(f"global gradient norm: {global_norm(rows):.4f}   ({len(rows)} tensors, {flagged} flagged)")
    return "\n".join(lines)


def to_json(rows: list[GradRow]) -> str:
    return json.dumps({
        "parameters": [{k: finite_or_none(v) if isinstance(v, float) else v for k, v in asdict(r).items()}
                       for r in rows],
        "global_norm": finite_or_none(global_norm(rows)),
    }, indent=1)


def model_and_config(config_path: str | None, ckpt: str | None, overrides: list[str]) -> tuple[GPT, TrainConfig]:
    """A model built from a config as `gptrain train` builds it, or a trained one from a checkpoint with the
    config it was trained with; --name=value overrides apply to either."""
    if ckpt is not None:
        return trained_model_and_config(find_checkpoint(ckpt), overrides)
    if config_path is None:
        raise UserError("give a CONFIG file or --ckpt DIR")
    config = build.load_run_config(config_path, overrides)
    dataset = build.open_dataset(config)
    resume = build.load_resume_checkpoint(config, dataset, announce=False) if config.init_from == "resume" else None
    return build.build_model(config, dataset, torch.device("cpu"), resume, announce=False), config


def trained_model_and_config(path, overrides: list[str]) -> tuple[GPT, TrainConfig]:
    model, state = model_from_checkpoint(path, torch.device("cpu"))
    saved = state.get("train_config")
    if not isinstance(saved, dict):
        raise UserError(f"{path} records no training config; give one: gptrain grads CONFIG --init_from=... or "
                        "train the model with gptrain")
    changes = parse_overrides(overrides)
    fixed = set(dataclasses.asdict(model.config)) - {"block_size", "dropout", "vocab_size"}
    if fixed & set(changes):
        raise UserError(f"--{sorted(fixed & set(changes))[0]} cannot change a trained model's shape; the model "
                        "keys come from the checkpoint (only block_size may be shortened)")
    try:
        config = build_config({**saved, **changes})
    except UserError as exc:
        raise UserError(f"{path}'s training config with your overrides is not valid: {exc}") from None
    if config.block_size > model.config.block_size:
        raise UserError(f"block_size {config.block_size} is longer than the {model.config.block_size} positions "
                        f"{path} was trained with; use at most {model.config.block_size}")
    check_fits_in_memory(model.config, torch.device("cpu"), config.batch_size, config.block_size)
    return model, config


def one_batch(config: TrainConfig, model: GPT, random_tokens: bool, device: torch.device):
    """A training batch as `gptrain train` draws its first one, or random tokens."""
    if config.batch_size == AUTO:  # found by a search of the device's memory, which grads does not run
        raise UserError("batch_size is auto in this config; gptrain grads measures one batch you name: give "
                        "--batch_size=N")
    block = min(config.block_size, model.config.block_size)
    if random_tokens:
        generator = torch.Generator().manual_seed(config.seed)
        rows = torch.randint(0, model.config.vocab_size, (config.batch_size, block + 1), generator=generator)
        return rows[:, :-1].to(device), rows[:, 1:].to(device)
    try:
        dataset = build.open_dataset(dataclasses.replace(config, block_size=block))
    except UserError as exc:
        raise UserError(f"{exc}; or pass --random to use random tokens") from None
    if dataset.vocab_size != model.config.vocab_size:
        raise UserError(f"dataset {dataset.folder} has vocab_size {dataset.vocab_size}, the model "
                        f"{model.config.vocab_size}")
    sampler = BatchSampler(dataset.splits["train"], config.batch_size, block, config.seed, device)
    return sampler.next_batch()


def run_grads(
    config_path: str | None, ckpt: str | None, overrides: list[str], random_tokens: bool, as_json: bool
) -> list[GradRow]:
    model, config = model_and_config(config_path, ckpt, overrides)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model.to(device).train()
    x, y = one_batch(config, model, random_tokens, device)
    with autocast(device, dtype):
        _, loss = model(x, y)
    loss.backward()
    rows = gradient_rows(model)
    if as_json:
        print(to_json(rows))
    else:
        what = "random tokens" if random_tokens else "tokens"
        print(f"loss {loss.item():.4f} on one batch of {x.shape[0]} x {x.shape[1]} {what} "
              f"({config.dataset if not random_tokens else 'no data'})")
        print(render_table(rows))
    return rows
