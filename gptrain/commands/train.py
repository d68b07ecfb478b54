"""`gptrain train CONFIG`: train from a YAML config (a file, or the name of a config gptrain ships)."""

from __future__ import annotations

import argparse

from gptrain.errors import UserError


def add_to(commands) -> None:
    train = commands.add_parser("train", help="train a model from a YAML config", description=(
        "Train from CONFIG, a YAML file or the name of a shipped config (`gptrain configs` lists them); any config "
        "key can be overridden as --name=value."), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", help="YAML config file, or a shipped config's name")
    train.add_argument("--overwrite", action="store_true",
                       help="start over in an out_dir that holds another run, replacing its checkpoints")
    train.epilog_factory = keys_help
    train.set_defaults(run=run)


def keys_help() -> str:
    from gptrain.config import keys_help

    return keys_help()


def run(args, extra: list[str]) -> None:
    from gptrain.build import load_run_config
    from gptrain.train import train

    if args.config is None:
        raise UserError("gptrain train needs a CONFIG, e.g. gptrain train shakespeare_char_cpu (a shipped config; "
                        "`gptrain configs` lists them) or a YAML file; any key can then be overridden with "
                        "--name=value")
    train(load_run_config(args.config, extra), overwrite=args.overwrite)
