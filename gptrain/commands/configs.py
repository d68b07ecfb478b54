"""`gptrain configs`: the configs gptrain ships, one line each; `gptrain configs copy NAME DEST` writes one to edit.
`gptrain train NAME` runs one by its name."""

from __future__ import annotations

from gptrain.commands.args import path_arg, refuse_extra


def add_to(commands) -> None:
    configs = commands.add_parser("configs", help="list the shipped configs, or copy one to edit",
                                  description="List the configs gptrain ships (train one with `gptrain train NAME`), "
                                              "or copy one to a file to edit.")
    actions = configs.add_subparsers(dest="action", parser_class=type(configs))
    copy = actions.add_parser("copy", help="write a shipped config to a file, to edit")
    copy.add_argument("name", help="a shipped config's name (see `gptrain configs`)")
    copy.add_argument("dest", type=path_arg, help="the file to write (or a folder to write NAME.yaml into)")
    copy.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    configs.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    from gptrain.config import copy_shipped_config, shipped_configs, summary_line

    refuse_extra(extra)
    if args.action == "copy":
        path = copy_shipped_config(args.name, args.dest, args.overwrite)
        print(f"wrote {path}; train it with: gptrain train {path}")
        return
    found = shipped_configs()
    width = max(len(name) for name in found)
    for name, path in found.items():
        print(f"{name:<{width}}  {summary_line(path)}")
