"""`gptrain sample`: stream text generated from a checkpoint to stdout."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from gptrain.commands.args import add_checkpoint_option, add_decoding_options, options_of, refuse_extra
from gptrain.errors import UserError
from gptrain.runtime.files import read_text


def add_to(commands) -> None:
    # Options left out are absent here: their defaults are SampleOptions', said once in gptrain/generation.py.
    sample = commands.add_parser("sample", help="generate text from a checkpoint", argument_default=argparse.SUPPRESS)
    add_checkpoint_option(sample)
    sample.add_argument("--start", help="prompt text, or FILE:path to read it from a file")
    sample.add_argument("--num_samples", type=int, help="samples to draw")
    sample.add_argument("--max_new_tokens", type=int, help="tokens per sample")
    add_decoding_options(sample)
    sample.add_argument("--interactive", action="store_true", help="a prompt loop (Ctrl-D quits)")
    sample.epilog_factory = defaults_help
    sample.set_defaults(run=run)


def defaults_help() -> str:
    from gptrain.generation import SampleOptions

    defaults = {f.name: f.default for f in dataclasses.fields(SampleOptions) if f.default is not dataclasses.MISSING}
    return "defaults: " + ", ".join(f"--{name} {value!r}" for name, value in defaults.items()
                                    if name != "interactive")


def run(args, extra: list[str]) -> None:
    from gptrain.generation import SampleOptions

    refuse_extra(extra)
    sample(SampleOptions(**options_of(args)))


def read_prompt(start: str) -> str:
    """`--start TEXT`, or `--start FILE:path` for a prompt kept in a file."""
    if start.startswith("FILE:"):
        start = read_text(Path(start[5:]), "prompt file", "give --start FILE:path of a UTF-8 text file")
    if start == "":
        raise UserError("the prompt is empty; pass --start with some text (e.g. --start $'\\n')")
    return start


def sample(options) -> list[str]:
    from gptrain.generation import Sampler

    sampler = Sampler(options)
    if options.interactive:
        return interactive(sampler)
    prompt = read_prompt(options.start)
    return [sampler.stream(prompt) for _ in range(options.num_samples)]


def interactive(sampler) -> list[str]:
    """A prompt loop: each line typed is a prompt (an empty line means a newline); Ctrl-D ends it."""
    samples = []
    print("type a prompt and press Enter; Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("prompt> ")
        except EOFError:
            print(file=sys.stderr)
            return samples
        try:
            samples.append(sampler.stream(line or "\n"))
        except UserError as exc:  # e.g. a character the model never saw: say so and ask again
            print(f"error: {exc}", file=sys.stderr)
