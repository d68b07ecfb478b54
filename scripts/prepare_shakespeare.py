"""Prepare Tiny Shakespeare (or any text file) as a character-level dataset for gptrain.

    python scripts/prepare_shakespeare.py                   # data/shakespeare_char/{train,val}.bin, meta.json
    python scripts/prepare_shakespeare.py --input my.txt --out data/my_char
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

from gptrain.cli import run_guarded
from gptrain.errors import UserError
from gptrain.prepare import prepare_char_dataset

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = ROOT / "data" / "shakespeare_char" / "input.txt"
SOURCE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def read_input(path: Path, default: bool) -> str:
    if not path.is_file():
        if not default:
            raise UserError(f"input file {path} not found; pass --input with the path of a text file")
        download(SOURCE_URL, path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8 first") from None


def download(url: str, path: Path) -> None:
    print(f"downloading {url} -> {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except OSError as exc:
        raise UserError(f"{path} is missing and downloading it failed ({exc}); copy the text there by hand") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=None, help="text file (default: the shipped Tiny Shakespeare)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: data/shakespeare_char)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="last fraction of the text held out")
    args = parser.parse_args(argv)
    input_path = args.input or DEFAULT_INPUT
    out_dir = args.out or DEFAULT_INPUT.parent
    text = read_input(input_path, default=args.input is None)
    meta = prepare_char_dataset(text, out_dir, args.val_fraction)
    print(f"length of dataset in characters: {meta['characters']:,}")
    print(f"vocab size: {meta['vocab_size']:,} ({meta['dtype']})")
    print(f"train has {meta['train_tokens']:,} tokens")
    print(f"val has {meta['val_tokens']:,} tokens")
    print(f"wrote {out_dir}/train.bin, val.bin, meta.json")


if __name__ == "__main__":
    sys.exit(run_guarded(main))
