"""`gptrain prepare shakespeare` as a script: `python scripts/prepare_shakespeare.py ARGS` is
`gptrain prepare shakespeare ARGS` (`gptrain prepare shakespeare --help` says what it takes)."""

import sys

from gptrain.cli import main as gptrain_main
from gptrain.cli import run_guarded


def main(argv: list[str] | None = None) -> None:
    gptrain_main(["prepare", "shakespeare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run_guarded(main))
