"""`gptrain prepare chat` as a script: `python scripts/prepare_chat.py ARGS` is `gptrain prepare chat ARGS`
(`gptrain prepare chat --help` says what it takes)."""

import sys

from gptrain.cli import main as gptrain_main
from gptrain.cli import run_guarded


def main(argv: list[str] | None = None) -> None:
    gptrain_main(["prepare", "chat", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run_guarded(main))
