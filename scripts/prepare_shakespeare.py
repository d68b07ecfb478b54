"""Prepare Tiny Shakespeare (or any text file) as a gptrain dataset. Re-running it leaves an identical dataset as
it is; an --out folder holding a different one (or a run) is refused unless --overwrite is given.

    python scripts/prepare_shakespeare.py                    # characters -> data/shakespeare_char/
    python scripts/prepare_shakespeare.py --tokenizer gpt2   # GPT-2 BPE  -> data/shakespeare/
    python scripts/prepare_shakespeare.py --input my.txt --out data/my_char

The first 90% of the characters train, the last 10% validate, as in nanoGPT.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

from gptrain.cli import ArgumentParser, finite_float, path_arg, run_guarded
from gptrain.data.prepare import describe, prepare
from gptrain.errors import UserError
from gptrain.runtime.files import require_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = ROOT / "data" / "shakespeare_char" / "input.txt"
SOURCE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def ensure_input(path: Path) -> None:
    """The shipped copy is used; only if it was deleted is it downloaded again."""
    if path.is_file():
        return
    print(f"downloading {SOURCE_URL} -> {path}")
    try:
        with urllib.request.urlopen(SOURCE_URL, timeout=60) as response:
            payload = response.read()
    except OSError as exc:
        raise UserError(f"{path} is missing and downloading it failed ({exc}); copy the text there by hand") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="prepare_shakespeare.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=path_arg, default=None,
                        help="text file (default: the shipped Tiny Shakespeare)")
    parser.add_argument("--out", type=path_arg, default=None,
                        help="output folder (default: data/shakespeare_char, or data/shakespeare for BPE)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different dataset (or other gptrain output) already in --out")
    parser.add_argument("--tokenizer", default="char", help="char (default), gpt2, or another tiktoken encoding")
    parser.add_argument("--val_fraction", type=finite_float, default=0.1, help="last fraction of the text held out")
    args = parser.parse_args(argv)
    if args.input is None:
        ensure_input(DEFAULT_INPUT)
    else:
        require_file(args.input, "input file", "pass --input with the path of a text file")
    default_out = ROOT / "data" / ("shakespeare_char" if args.tokenizer == "char" else "shakespeare")
    out_dir = args.out or default_out
    meta, unchanged = prepare([args.input or DEFAULT_INPUT], out_dir, args.tokenizer, args.val_fraction,
                           overwrite=args.overwrite)
    print(describe(meta, out_dir, unchanged))


if __name__ == "__main__":
    sys.exit(run_guarded(main))
