"""`gptrain sample`: load a checkpoint safely and print text generated from a prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.errors import UserError
from gptrain.runtime import autocast, resolve_device, resolve_dtype
from gptrain.tokenizer import tokenizer_from_meta

RULE = "-" * 40


@dataclass
class SampleOptions:
    ckpt: str
    start: str = "\n"
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"


def read_prompt(start: str) -> str:
    """`--start TEXT`, or `--start FILE:path` for a prompt kept in a file."""
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            raise UserError(f"prompt file {path} not found")
        start = path.read_text(encoding="utf-8")
    if start == "":
        raise UserError("the prompt is empty; pass --start with some text (e.g. --start $'\\n')")
    return start


def validate(options: SampleOptions) -> None:
    if options.num_samples < 1 or options.max_new_tokens < 0:
        raise UserError("--num_samples must be >= 1 and --max_new_tokens >= 0")
    if options.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 is greedy), got {options.temperature}")
    if options.top_k is not None and options.top_k < 1:
        raise UserError(f"--top_k must be >= 1, got {options.top_k}")
    if options.top_p is not None and not 0 < options.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {options.top_p}")


def sample(options: SampleOptions) -> list[str]:
    validate(options)
    prompt = read_prompt(options.start)
    device = resolve_device(options.device)
    model, ckpt = model_from_checkpoint(find_checkpoint(options.ckpt), device)
    model.eval()
    tokenizer = tokenizer_from_meta(ckpt["dataset_meta"])
    prompt_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(options.seed)
    samples = []
    with autocast(device, resolve_dtype(options.dtype, device)):
        for _ in range(options.num_samples):
            out = model.generate(
                prompt_ids, options.max_new_tokens, options.temperature, options.top_k, options.top_p, generator
            )
            text = tokenizer.decode(out[0].tolist())
            print(text, flush=True)
            print(RULE, flush=True)
            samples.append(text)
    return samples
