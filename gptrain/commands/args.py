"""What every command's arguments share: the parser that reports a bad argument as one `error:` line, and the
argument types that refuse what argparse would take silently."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from gptrain.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse prints usage and its own prefix; gptrain reports every bad input as one `error:` line."""

    epilog_factory = None  # makes the epilog only when help is shown (it may import torch)

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def path_arg(text: str) -> Path:
    """A path option: an empty one would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(text)


def finite_float(text: str) -> float:
    """A float option: nan and inf are refused (argparse's float() would take them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def refuse_extra(extra: list[str]) -> None:
    """Only train, bench, explain and grads take --name=value config overrides; the others take none."""
    if extra:
        raise UserError(f"unrecognized arguments: {' '.join(extra)}")


def add_checkpoint_option(parser, what: str = "run folder (uses ckpt_best.pt, else ckpt_last.pt) or .pt file"):
    parser.add_argument("--ckpt", type=path_arg, required=True, help=what)


def add_decoding_options(parser) -> None:
    """How `sample` and `chat` pick each next token, and where they run."""
    parser.add_argument("--temperature", type=finite_float, help="0 is greedy decoding")
    parser.add_argument("--top_k", type=int, help="keep the k likeliest tokens")
    parser.add_argument("--top_p", type=finite_float, help="nucleus sampling mass, e.g. 0.9")
    parser.add_argument("--seed", type=int, help="seeds the sampling")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", help=DECODING_DTYPE_HELP)


DECODING_DTYPE_HELP = ("what the model decodes in: auto (bfloat16 where the device computes it natively, float16 on "
                       "older GPUs, else float32), float32, bfloat16, float16, or int8 (weight matrices in 8 bits, "
                       "the rest float32: CPUs only)")


def options_of(args, *leave_out: str) -> dict:
    """The parsed arguments as keyword arguments of a command's options dataclass."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "run", *leave_out)}


def add_reading_options(parser) -> None:
    """The options behind data.readers.ReadOptions, shared by the commands that read text inputs."""
    parser.add_argument("--text_field", default="text",
                        help="the field of a .jsonl record, or the column of a Parquet file or dataset, that holds "
                             "the text (default text)")
    parser.add_argument("--split", default="train",
                        help="the split to read from a Hugging Face dataset that has several (default train)")
    parser.add_argument("--errors", choices=("strict", "replace"), default="strict",
                        help="undecodable bytes: stop with an error (default) or replace them with U+FFFD")
