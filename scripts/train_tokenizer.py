"""`gptrain tokenizer train` as a script: `python scripts/train_tokenizer.py ARGS` is `gptrain tokenizer train ARGS`
(`gptrain tokenizer train --help` says what it takes)."""

import sys

from gptrain.cli import main as gptrain_main
from gptrain.cli import run_guarded


def main(argv: list[str] | None = None) -> None:
    gptrain_main(["tokenizer", "train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run_guarded(main))
