"""Prepare your own text as a gptrain dataset, streaming, in parallel.

    python scripts/prepare_text.py book.txt --out data/book                       # characters
    python scripts/prepare_text.py corpus/ --out data/corpus --tokenizer gpt2 --workers 8
    python scripts/prepare_text.py docs.jsonl --out data/docs --tokenizer gpt2 --text_field content
    python scripts/prepare_text.py shards/ --out data/web --tokenizer tok/ --workers 8   # Parquet, own BPE
    python scripts/prepare_text.py saved/ hf:roneneldan/TinyStories --out data/ts --tokenizer gpt2 --split train

INPUT is a text file, a folder of .txt/.md files (each file a document), a .jsonl file (each line a document),
a .parquet file or a folder of them (each row a document), a folder written by Hugging Face datasets'
save_to_disk, or hf:NAME[:CONFIG], a dataset that datasets.load_dataset has already downloaded (read offline,
from the local cache). --tokenizer takes a folder made by scripts/train_tokenizer.py for your own BPE. With
BPE, documents are separated by <|endoftext|>. The validation split takes whole documents,
chosen by a seeded draw; a single document is split by position (its last val_fraction of characters).
An --out folder that already holds a different dataset (or a run) is refused unless --overwrite is given;
re-running the same command over the same inputs leaves it unchanged.
"""

from __future__ import annotations

import argparse
import sys

from gptrain.cli import ArgumentParser, finite_float, path_arg, run_guarded
from gptrain.data.prepare import describe, prepare
from gptrain.data.readers import add_reading_options


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="prepare_text.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=path_arg, metavar="INPUT")
    parser.add_argument("--out", type=path_arg, required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different dataset (or other gptrain output) already in --out")
    parser.add_argument("--tokenizer", default="char",
                        help="char, gpt2 (offline), another tiktoken encoding, or a folder holding your own "
                             "tokenizer.json (scripts/train_tokenizer.py)")
    parser.add_argument("--val_fraction", type=finite_float, default=0.1,
                        help="share of documents held out (default 0.1)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the choice of validation documents")
    add_reading_options(parser)
    parser.add_argument("--dtype", default="auto", help="token dtype: auto (smallest that fits), uint8/16/32")
    args = parser.parse_args(argv)
    meta, unchanged = prepare(args.inputs, args.out, args.tokenizer, args.val_fraction, args.workers, args.seed,
                           args.text_field, args.errors, args.dtype, args.overwrite, args.split)
    print(describe(meta, args.out, unchanged))


if __name__ == "__main__":
    sys.exit(run_guarded(main))
