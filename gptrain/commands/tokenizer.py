"""`gptrain tokenizer train`: your own byte-level BPE, trained with Hugging Face tokenizers on the inputs `gptrain
prepare text` reads (gptrain/data/bpe_training.py)."""

from __future__ import annotations

import argparse

from gptrain.commands.args import add_reading_options, path_arg, refuse_extra

TRAIN = """Train your own byte-level BPE tokenizer (Hugging Face tokenizers):

    gptrain tokenizer train corpus/ --vocab_size 8192 --out data/tok
    gptrain tokenizer train zh.txt --vocab_size 4096 --out data/zh_tok --pattern gpt4
    gptrain tokenizer train shards/ --vocab_size 32768 --out tok --max_chars 2000000000
    gptrain prepare text corpus/ --out data/corpus --tokenizer data/tok

INPUT is anything `gptrain prepare text` takes: text files, folders, .jsonl, .parquet, a folder written by Hugging
Face datasets' save_to_disk, or hf:NAME. Byte-level: every byte is a token, so no text is ever unknown and any
script or emoji comes back exactly; <|endoftext|> is reserved as the document separator. --pattern chooses how text
is cut into pre-tokens before merging: gpt2 (GPT-2's regex) or gpt4 (GPT-4's cl100k regex: digits in groups of 1-3,
contractions in any case, punctuation kept off words, newlines kept apart), the better default for most text.
Writes OUT/tokenizer.json (what `gptrain prepare text --tokenizer OUT` reads) and OUT/training.json."""


def add_to(commands) -> None:
    tokenizer = commands.add_parser("tokenizer", help="train your own byte-level BPE tokenizer",
                                    description="`gptrain tokenizer train --help`.")
    actions = tokenizer.add_subparsers(dest="action", required=True, parser_class=type(tokenizer))
    train = actions.add_parser("train", help="train a byte-level BPE on your text", description=TRAIN,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("inputs", nargs="+", type=path_arg, metavar="INPUT")
    train.add_argument("--vocab_size", type=int, required=True,
                       help="tokens in all: the 256 bytes, <|endoftext|> and the merges learned")
    train.add_argument("--out", type=path_arg, required=True, help="output folder (for tokenizer.json)")
    train.add_argument("--pattern", choices=("gpt4", "gpt2"), default="gpt4",
                       help="pre-tokenisation regex: gpt4 (default) or gpt2")
    train.add_argument("--overwrite", action="store_true", help="replace the tokenizer in a non-empty --out")
    train.add_argument("--max_chars", type=int, default=None,
                       help="train on the first N characters only (a sample is enough for a large corpus)")
    add_reading_options(train)
    train.set_defaults(run=run_train)


def run_train(args, extra: list[str]) -> None:
    from gptrain.data.bpe_training import describe_training, train_tokenizer
    from gptrain.data.readers import ReadOptions

    refuse_extra(extra)
    info, unchanged = train_tokenizer(args.inputs, args.out, args.vocab_size, args.pattern,
                                      ReadOptions(args.text_field, args.errors, args.split), args.max_chars,
                                      args.overwrite)
    print(describe_training(info, args.out, unchanged))
