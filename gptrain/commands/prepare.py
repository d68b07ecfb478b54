"""`gptrain prepare shakespeare|text|chat`: text or conversations -> a token dataset folder (train.bin, val.bin,
meta.json; a chat dataset adds its masks and conversation offsets). gptrain/data/prepare.py and chat_prepare.py
do the work; every preparation publishes its folder whole (gptrain/runtime/publish.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptrain.commands.args import add_reading_options, finite_float, path_arg, refuse_extra
from gptrain.errors import UserError

SHAKESPEARE = """Tiny Shakespeare (1.1 MB, shipped with gptrain) or any text file -> a dataset, the first 90% of the
characters training and the last 10% validating, as in nanoGPT:

    gptrain prepare shakespeare                    # characters -> data/shakespeare_char/
    gptrain prepare shakespeare --tokenizer gpt2   # GPT-2 BPE  -> data/shakespeare/
    gptrain prepare shakespeare --input my.txt --out data/my_char

Running it again over the same dataset leaves it as it is; an --out folder holding a different one (or a run) is
refused unless --overwrite is given."""

TEXT = """Your own text as a dataset, streaming, in parallel:

    gptrain prepare text book.txt --out data/book                       # characters
    gptrain prepare text corpus/ --out data/corpus --tokenizer gpt2 --workers 8
    gptrain prepare text docs.jsonl --out data/docs --tokenizer gpt2 --text_field content
    gptrain prepare text shards/ --out data/web --tokenizer tok/ --workers 8   # Parquet, your own BPE
    gptrain prepare text saved/ hf:roneneldan/TinyStories --out data/ts --tokenizer gpt2 --split train

INPUT is a text file, a folder of .txt/.md files (each file a document), a .jsonl file (each line a document), a
.parquet file or a folder of them (each row a document), a folder written by Hugging Face datasets' save_to_disk,
or hf:NAME[:CONFIG], a dataset that datasets.load_dataset has already downloaded (read offline, from the local
cache). --tokenizer takes a folder made by `gptrain tokenizer train` for your own BPE. Documents are separated by
<|endoftext|> with BPE and by the character U+2403 (the symbol for End of Text) with
characters. The validation split takes whole documents, chosen by
a seeded draw; a single document is split by position (its last val_fraction of characters). An --out folder
that already holds a different dataset (or a run) is refused unless --overwrite is given; re-running the same
command over the same inputs leaves it unchanged."""

CHAT = """Conversations as a chat dataset (token ids, the loss mask, the conversations' offsets):

    gptrain prepare chat chats.jsonl --out data/chats --tokenizer char --block_size 128
    gptrain prepare chat a.jsonl b.jsonl --out data/chats --tokenizer gpt2 --block_size 1024
    gptrain prepare chat chats.jsonl --out data/chats --tokenizer from:out/shakespeare_char_cpu
    gptrain prepare chat chats.jsonl --out data/chats --tokenizer from:models/Qwen2.5-0.5B-Instruct

Each line of INPUT is one conversation in the format most public chat datasets use:
{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}: an optional system message, then
user and assistant alternating, starting with user and ending with assistant. The loss counts the assistant
messages only. --tokenizer from:MODEL takes the base tokenizer of the model you will fine-tune (a run folder, a .pt
file or a Hugging Face model folder), so the ids mean the same text; --block_size then defaults to its model's. A
model whose tokenizer carries its own chat template (Llama 3, Qwen2.5, Qwen3, SmolLM2, ...) is fine-tuned through
it, each conversation rendered as transformers' apply_chat_template renders it; others get gptrain's template. A
bad conversation (unknown role, empty content, not alternating, longer than --block_size, a character outside the
vocabulary, answers the model's template hides) stops the preparation with its file and line, or with --on_error
skip is left out and counted. The validation split takes whole conversations, chosen by a seeded draw. An --out
folder that already holds a different dataset (or a run) is refused unless --overwrite is given.

A line may instead be a preference pair, for DPO, in TRL's formats: {"prompt": [messages], "chosen": [messages],
"rejected": [messages]}, or {"prompt": "...", "chosen": "...", "rejected": "..."} in plain text for a model without
a chat template. A file's first line tells what it holds, and the files of one dataset hold one kind. Each answer is
stored with its prompt's tokens before it, chosen then rejected, the mask on the answer only; bad pairs stop the
preparation or are skipped as bad conversations are (docs/chat.md, Preference pairs)."""


def add_to(commands) -> None:
    prepare = commands.add_parser("prepare", help="text or conversations -> a token dataset (shakespeare, text, chat)",
                                  description="Prepare a dataset: `gptrain prepare shakespeare|text|chat --help`.")
    kinds = prepare.add_subparsers(dest="kind", required=True, parser_class=type(prepare))
    for name, help_text, description, add_options, run in (
            ("shakespeare", "Tiny Shakespeare (shipped) or one text file", SHAKESPEARE, shakespeare_options,
             run_shakespeare),
            ("text", "text files, .jsonl, Parquet or Hugging Face datasets", TEXT, text_options, run_text),
            ("chat", "conversations in .jsonl files", CHAT, chat_options, run_chat)):
        parser = kinds.add_parser(name, help=help_text, description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(parser)
        parser.add_argument("--overwrite", action="store_true",
                            help="replace a different dataset (or other gptrain output) already in --out")
        parser.set_defaults(run=run)


def shakespeare_options(parser) -> None:
    parser.add_argument("--input", type=path_arg, default=None,
                        help="text file (default: the Tiny Shakespeare gptrain ships)")
    parser.add_argument("--out", type=path_arg, default=None,
                        help="output folder (default: data/shakespeare_char, or data/shakespeare for BPE)")
    parser.add_argument("--tokenizer", default="char", help="char (default), gpt2, or another tiktoken encoding")
    parser.add_argument("--val_fraction", type=finite_float, default=0.1, help="last fraction of the text held out")


def text_options(parser) -> None:
    parser.add_argument("inputs", nargs="+", type=path_arg, metavar="INPUT")
    parser.add_argument("--out", type=path_arg, required=True, help="output folder")
    parser.add_argument("--tokenizer", default="char",
                        help="char, gpt2 (offline), another tiktoken encoding, or a folder holding your own "
                             "tokenizer.json (gptrain tokenizer train)")
    parser.add_argument("--val_fraction", type=finite_float, default=0.1,
                        help="share of documents held out (default 0.1)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the choice of validation documents")
    add_reading_options(parser)
    parser.add_argument("--dtype", default="auto", help="token dtype: auto (smallest that fits), uint8/16/32")


def chat_options(parser) -> None:
    parser.add_argument("inputs", nargs="+", type=path_arg, metavar="INPUT",
                        help=".jsonl files of conversations (or of preference pairs)")
    parser.add_argument("--out", type=path_arg, required=True, help="output folder")
    parser.add_argument("--tokenizer", default="char",
                        help="char, gpt2, a folder holding tokenizer.json, or from:MODEL (default char)")
    parser.add_argument("--block_size", type=int,
                        help="the longest conversation in tokens (required unless --tokenizer from:MODEL)")
    parser.add_argument("--val_fraction", type=finite_float, default=0.1,
                        help="share of conversations held out (default 0.1)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the choice of validation conversations")
    parser.add_argument("--on_error", choices=("stop", "skip"), default="stop",
                        help="a bad conversation or pair: stop with its file and line (default), or skip it and "
                             "count")


def run_shakespeare(args, extra: list[str]) -> None:
    from gptrain.data.prepare import TINY_SHAKESPEARE, describe, prepare
    from gptrain.runtime.files import require_file

    refuse_extra(extra)
    source = require_file(args.input, "input file", "pass --input with the path of a text file") \
        if args.input is not None else TINY_SHAKESPEARE
    out = args.out or Path("data") / ("shakespeare_char" if args.tokenizer == "char" else "shakespeare")
    meta, unchanged = prepare([source], out, args.tokenizer, args.val_fraction, overwrite=args.overwrite)
    print(describe(meta, out, unchanged))


def run_text(args, extra: list[str]) -> None:
    from gptrain.data.prepare import describe, prepare

    refuse_extra(extra)
    meta, unchanged = prepare(args.inputs, args.out, args.tokenizer, args.val_fraction, args.workers, args.seed,
                              args.text_field, args.errors, args.dtype, args.overwrite, args.split)
    print(describe(meta, args.out, unchanged))


def run_chat(args, extra: list[str]) -> None:
    from gptrain.data.chat_prepare import ChatPrepareOptions, describe, prepare_chat

    refuse_extra(extra)
    checkpoint = checkpoint_tokenizer(args.tokenizer[len("from:"):]) if args.tokenizer.startswith("from:") else None
    options = ChatPrepareOptions(args.tokenizer, args.block_size, args.val_fraction, args.seed, args.on_error,
                                 args.overwrite, checkpoint)
    meta, unchanged, problems = prepare_chat(args.inputs, args.out, options)
    if problems.counts:
        print(problems.summary(), file=sys.stderr)
    print(describe(meta, args.out, unchanged))


def checkpoint_tokenizer(source: str):
    """The tokenizer and context length of the model a chat dataset is prepared for (--tokenizer from:MODEL): a
    checkpoint or run folder, or a Hugging Face model folder (config.json and its tokenizer files)."""
    from gptrain.checkpoint import find_checkpoint, load_checkpoint, model_config_from, model_config_of
    from gptrain.data.chat_prepare import CheckpointTokenizer
    from gptrain.data.hf_tokenizer import tokenizer_meta_of_folder
    from gptrain.runtime.files import kind_of

    path = Path(source)
    if kind_of(path / "config.json") == "file":  # a Hugging Face model folder, read without its weights
        meta, block_size = tokenizer_meta_of_folder(path), model_config_of(path).block_size
    else:
        checkpoint = find_checkpoint(path)
        ckpt = load_checkpoint(checkpoint)
        meta, block_size = ckpt.get("dataset_meta"), model_config_from(ckpt, checkpoint).block_size
    if not meta:
        raise UserError(f"{source} records no tokenizer (no tokenizer.json); give --tokenizer char, gpt2 or a "
                        "tokenizer folder")
    return CheckpointTokenizer(source, meta, block_size)
