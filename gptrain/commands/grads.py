"""`gptrain grads`: per-parameter gradient statistics from one forward/backward pass (gptrain/analysis/grads.py)."""

from __future__ import annotations

from gptrain.commands.args import path_arg
from gptrain.errors import UserError


def add_to(commands) -> None:
    grads = commands.add_parser("grads", help="per-parameter gradient statistics from one forward/backward pass",
                                description="One forward/backward pass on a real batch (or random tokens), then "
                                            "a row per parameter tensor; --name=value overrides config keys.")
    grads.add_argument("config", nargs="?", help="YAML config (a fresh model), or use --ckpt")
    grads.add_argument("--ckpt", type=path_arg, help="run folder or checkpoint file (a trained model)")
    grads.add_argument("--random", dest="random_tokens", action="store_true",
                       help="random tokens instead of a batch of the dataset")
    grads.add_argument("--json", action="store_true", help="print JSON instead of the table")
    grads.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    from gptrain.analysis.grads import run_grads

    if (args.config is None) == (args.ckpt is None):
        raise UserError("gptrain grads takes a CONFIG file or --ckpt DIR (one of them)")
    run_grads(args.config, args.ckpt, extra, args.random_tokens, args.json)
