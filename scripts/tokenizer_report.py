"""Compression of your own BPE against GPT-2's, in bytes per token on held-out text (more is better).

    python scripts/make_cjk_text.py                               # once: data/zh/input.txt, Chinese
    python scripts/tokenizer_report.py                            # Tiny Shakespeare and that text

Each text is cut by position: own tokenizers train on the first 90% and every tokenizer, GPT-2's included,
encodes the last 10%, which none of them has seen. Prints a Markdown table, one row per text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptrain.cli import run_guarded
from gptrain.commands.args import ArgumentParser, path_arg
from gptrain.data.bpe_training import train_bpe
from gptrain.data.prepare import TINY_SHAKESPEARE
from gptrain.data.tokenizer import load_tokenizer
from gptrain.runtime.files import read_text

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = 0.1
OWN = (("gpt4", 2048), ("gpt4", 4096), ("gpt4", 8192), ("gpt2", 8192))  # (pattern, vocabulary) of those trained


def bytes_per_token(tokenizer, text: str) -> float:
    return len(text.encode("utf-8")) / len(tokenizer.encode(text))


def report_row(name: str, text: str, gpt2) -> str:
    cut = int(len(text) * (1 - HELD_OUT))
    seen, held_out = text[:cut], text[cut:]
    cells = [f"{bytes_per_token(gpt2, held_out):.2f}"]
    for pattern, vocab_size in OWN:
        cells.append(f"{bytes_per_token(train_bpe([seen], vocab_size, pattern), held_out):.2f}")
    return (f"| {name} | {len(seen.encode('utf-8')) / 1e6:.2f} MB | {len(held_out.encode('utf-8')) / 1e6:.2f} MB | "
            + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="tokenizer_report.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--english", type=path_arg, default=TINY_SHAKESPEARE)
    parser.add_argument("--cjk", type=path_arg, default=ROOT / "data" / "zh" / "input.txt")
    args = parser.parse_args(argv)
    texts = {"English (Tiny Shakespeare)": read_text(args.english, "text", "run scripts/prepare_shakespeare.py"),
             "Chinese (make_cjk_text.py)": read_text(args.cjk, "text", "run scripts/make_cjk_text.py --out "
                                                     f"{args.cjk} first")}
    own = " | ".join(f"own {pattern} {vocab_size:,}" for pattern, vocab_size in OWN)
    print(f"| text | trained on | held out | GPT-2 50,257 | {own} |")
    print("|---" * (4 + len(OWN)) + "|")
    gpt2 = load_tokenizer("gpt2")
    for name, text in texts.items():
        print(report_row(name, text, gpt2))


if __name__ == "__main__":
    sys.exit(run_guarded(main))
