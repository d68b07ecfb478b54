"""Prepare conversations as a gptrain chat dataset (token ids, the loss mask, the conversations' offsets).

    python scripts/prepare_chat.py chats.jsonl --out data/chats --tokenizer char --block_size 128
    python scripts/prepare_chat.py a.jsonl b.jsonl --out data/chats --tokenizer gpt2 --block_size 1024
    python scripts/prepare_chat.py chats.jsonl --out data/chats --tokenizer from:out/shakespeare_char_cpu

Each line of INPUT is one conversation in the format most public chat datasets use:
{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}: an optional system message,
then user and assistant alternating, starting with user and ending with assistant. The loss counts the
assistant messages only. --tokenizer from:CKPT takes the base tokenizer of a checkpoint (a run folder or .pt
file) you will fine-tune, so the ids mean the same text; --block_size then defaults to its model's. A bad
conversation (unknown role, empty content, not alternating, longer than --block_size, a character outside the
vocabulary) stops the preparation with its file and line, or with --on_error skip is left out and counted.
The validation split takes whole conversations, chosen by a seeded draw. An --out folder that already holds a
different dataset (or a run) is refused unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import sys

from gptrain.cli import ArgumentParser, finite_float, path_arg, run_guarded
from gptrain.data.chat_prepare import ON_ERROR, ChatPrepareOptions, describe, prepare_chat


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="prepare_chat.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=path_arg, metavar="INPUT", help=".jsonl files of conversations")
    parser.add_argument("--out", type=path_arg, required=True, help="output folder")
    parser.add_argument("--tokenizer", default="char",
                        help="char, gpt2, a folder holding tokenizer.json, or from:CKPT (default char)")
    parser.add_argument("--block_size", type=int,
                        help="the longest conversation in tokens (required unless --tokenizer from:CKPT)")
    parser.add_argument("--val_fraction", type=finite_float, default=0.1,
                        help="share of conversations held out (default 0.1)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the choice of validation conversations")
    parser.add_argument("--on_error", choices=ON_ERROR, default="stop",
                        help="a bad conversation: stop with its file and line (default), or skip it and count")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different dataset (or other gptrain output) already in --out")
    args = parser.parse_args(argv)
    options = ChatPrepareOptions(args.tokenizer, args.block_size, args.val_fraction, args.seed, args.on_error,
                                 args.overwrite)
    meta, unchanged, problems = prepare_chat(args.inputs, args.out, options)
    if problems.counts:
        print(problems.summary(), file=sys.stderr)
    print(describe(meta, args.out, unchanged))


if __name__ == "__main__":
    sys.exit(run_guarded(main))
