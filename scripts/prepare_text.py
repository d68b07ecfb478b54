"""`gptrain prepare text` as a script: `python scripts/prepare_text.py ARGS` is `gptrain prepare text ARGS`
(`gptrain prepare text --help` says what it takes)."""

import sys

from gptrain.cli import main as gptrain_main
from gptrain.cli import run_guarded


def main(argv: list[str] | None = None) -> None:
    gptrain_main(["prepare", "text", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run_guarded(main))
