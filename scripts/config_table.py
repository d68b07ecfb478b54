"""Write the table of config keys into docs/configuration.md from their declarations in gptrain/config.py.

    python scripts/config_table.py          # rewrite the table in place
    python scripts/config_table.py --check  # exit 1 if the page's table differs (tests/test_config.py checks it)

Each key's default and meaning are declared once, beside the key (`key(default, help)` in TrainConfig); the
docs page, `gptrain train --help` and the did-you-mean errors all read them from there.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gptrain.config import keys_table

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
HEADER = "| key | default | meaning |"


def page_with_table(text: str) -> str:
    """The page's text with its table of keys (the header line and the table lines after it) replaced."""
    lines = text.split("\n")
    start = lines.index(HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:start] + keys_table().split("\n") + lines[end:])


def main() -> None:
    text = PAGE.read_text(encoding="utf-8")
    updated = page_with_table(text)
    if "--check" in sys.argv[1:]:
        sys.exit(0 if updated == text else "docs/configuration.md's table of config keys is out of date: run "
                                           "python scripts/config_table.py")
    PAGE.write_text(updated, encoding="utf-8")


if __name__ == "__main__":
    main()
