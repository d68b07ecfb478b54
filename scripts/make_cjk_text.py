"""Write a Chinese test text for measuring tokenizers, the same every time for the same seed.

    pip install jieba        # MIT licensed; its dictionary is the word list used here
    python scripts/make_cjk_text.py                     # data/zh/input.txt, 1,000,000 characters

Words are drawn by their frequency in jieba's dictionary (349,046 words with counts from a large Chinese corpus),
so characters and words come as often as in real text, and are set in clauses of 2-8 words, sentences of 1-4
clauses ending in 。？or！, and paragraphs of 3-8 sentences, about one punctuation mark every 8 characters as in
written Chinese. It reads as nonsense, but its statistics are what a tokenizer sees: enough to compare
compression, not to judge a model's prose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from gptrain.cli import run_guarded
from gptrain.commands.args import ArgumentParser, path_arg
from gptrain.errors import UserError
from gptrain.runtime.files import check_output_file
from gptrain.runtime.outdir import check_creatable


def jieba_words() -> tuple[list[str], np.ndarray]:
    """The dictionary's words written wholly in CJK ideographs, and their frequencies."""
    try:
        import jieba
    except ImportError:
        raise UserError("make_cjk_text.py needs jieba's word list: pip install jieba") from None
    words, counts = [], []
    dictionary = Path(jieba.__file__).parent / "dict.txt"
    for line in dictionary.read_text(encoding="utf-8").splitlines():
        word, count, _ = line.split(" ")
        if all("\u4e00" <= ch <= "\u9fff" for ch in word):
            words.append(word)
            counts.append(int(count))
    return words, np.asarray(counts, dtype=np.float64)


def paragraph(rng: np.random.Generator, draw) -> str:
    """3-8 sentences of 1-4 clauses of 2-8 words; `draw(n)` gives n words."""
    sentences = []
    for _ in range(rng.integers(3, 9)):
        clauses = ["".join(draw(rng.integers(2, 9))) for _ in range(rng.integers(1, 5))]
        sentences.append("，".join(clauses) + rng.choice(["。", "。", "。", "。", "。", "。", "？", "！"]))
    return "".join(sentences)


def make_text(chars: int, seed: int) -> str:
    words, counts = jieba_words()
    rng = np.random.default_rng(seed)
    pool = iter(())

    def draw(n: int) -> list[str]:
        nonlocal pool
        picked = []
        for _ in range(n):
            word = next(pool, None)
            if word is None:  # draw words 100,000 at a time: one call to choice, not one per word
                pool = iter(rng.choice(len(words), size=100_000, p=counts / counts.sum()).tolist())
                word = next(pool)
            picked.append(words[word])
        return picked

    paragraphs, total = [], 0
    while total < chars:
        paragraphs.append(paragraph(rng, draw))
        total += len(paragraphs[-1]) + 1
    return "\n".join(paragraphs)[:chars]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="make_cjk_text.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=path_arg, default=Path("data/zh/input.txt"),
                        help="the text file to write (default data/zh/input.txt)")
    parser.add_argument("--chars", type=int, default=1_000_000, help="its length in characters (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.chars < 1:
        raise UserError(f"--chars must be at least 1, got {args.chars}")
    check_creatable(args.out.parent, "the folder of --out")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    check_output_file(args.out, "--out")
    text = make_text(args.chars, args.seed)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text):,} characters, {len(text.encode('utf-8')):,} bytes")


if __name__ == "__main__":
    sys.exit(run_guarded(main))
