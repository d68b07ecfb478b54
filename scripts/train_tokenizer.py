"""Train your own byte-level BPE tokenizer (Hugging Face tokenizers) on the inputs prepare_text.py reads.

    python scripts/train_tokenizer.py corpus/ --vocab_size 8192 --out data/tok
    python scripts/train_tokenizer.py zh.txt --vocab_size 4096 --out data/zh_tok --pattern gpt4
    python scripts/train_tokenizer.py shards/ --vocab_size 32768 --out tok --max_chars 2000000000
    python scripts/prepare_text.py corpus/ --out data/corpus --tokenizer data/tok

INPUT is anything prepare_text.py takes: text files, folders, .jsonl, .parquet, a folder written by Hugging Face
datasets' save_to_disk, or hf:NAME. Byte-level: every byte is a token, so no text is ever unknown and any script
or emoji comes back exactly; <|endoftext|> is reserved as the document separator. --pattern chooses how text is
cut into pre-tokens before merging: gpt2 (GPT-2's regex) or gpt4 (GPT-4's cl100k regex: digits in groups of
1-3, contractions in any case, punctuation kept off words, newlines kept apart), the better default for most
text. Writes OUT/tokenizer.json (what prepare_text.py --tokenizer OUT reads) and OUT/training.json.
"""

from __future__ import annotations

import argparse
import sys

from gptrain.cli import ArgumentParser, path_arg, run_guarded
from gptrain.data.bpe_training import describe_training, train_tokenizer
from gptrain.data.hf_bpe import PATTERNS
from gptrain.data.readers import ReadOptions, add_reading_options


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="train_tokenizer.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=path_arg, metavar="INPUT")
    parser.add_argument("--vocab_size", type=int, required=True,
                        help="tokens in all: the 256 bytes, <|endoftext|> and the merges learned")
    parser.add_argument("--out", type=path_arg, required=True, help="output folder (for tokenizer.json)")
    parser.add_argument("--pattern", choices=tuple(PATTERNS), default="gpt4",
                        help="pre-tokenisation regex: gpt4 (default) or gpt2")
    parser.add_argument("--overwrite", action="store_true", help="replace the tokenizer in a non-empty --out")
    parser.add_argument("--max_chars", type=int, default=None,
                        help="train on the first N characters only (a sample is enough for a large corpus)")
    add_reading_options(parser)
    args = parser.parse_args(argv)
    info, unchanged = train_tokenizer(args.inputs, args.out, args.vocab_size, args.pattern,
                           ReadOptions(args.text_field, args.errors, args.split), args.max_chars, args.overwrite)
    print(describe_training(info, args.out, unchanged))


if __name__ == "__main__":
    sys.exit(run_guarded(main))
