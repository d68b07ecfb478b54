"""`gptrain compare RUN ...`: several runs' losses in one picture and a table of how they differ
(gptrain/analysis/compare.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from gptrain.commands.args import path_arg, refuse_extra


def add_to(commands) -> None:
    compare = commands.add_parser("compare", help="several runs' losses in one picture, and a table of how they "
                                                  "differ (needs gptrain[plot])")
    compare.add_argument("runs", nargs="+", type=path_arg, metavar="RUN", help="a run's out_dir")
    compare.add_argument("--out", type=path_arg, default=Path("compare.png"),
                         help="the picture to write (default compare.png; replaces only a PNG)")
    compare.add_argument("--x", choices=("tokens", "time", "iter"), default="tokens",
                         help="the x axis: tokens seen (default), training time or iteration")
    compare.add_argument("--json", action="store_true", help="print JSON instead of the table")
    compare.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    from gptrain.analysis.compare import compare, render, to_json

    refuse_extra(extra)
    rows, _ = compare(args.runs, args.x, args.out)
    print(to_json(rows) if args.json else render(rows))
    print(f"wrote {args.out}", file=sys.stderr if args.json else sys.stdout)  # stdout stays pure JSON
