"""`gptrain explain CONFIG`: one training iteration, executed and narrated stage by stage
(gptrain/analysis/explain.py)."""

from __future__ import annotations


def add_to(commands) -> None:
    explain = commands.add_parser("explain", help="run one training iteration of CONFIG and explain each stage with "
                                                  "its real numbers", description=(
        "One training iteration of CONFIG, executed and narrated stage by stage (batch, forward, loss division, "
        "backward, clipping, learning rate, update, zero_grad), each beside the gptrain function doing it; "
        "--name=value overrides config keys. Writes nothing."))
    explain.add_argument("config", help="YAML config file, or a shipped config's name")
    explain.add_argument("--json", action="store_true", help="print every stage's figures as one JSON object")
    explain.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    from gptrain.analysis.explain import explain, render, to_json
    from gptrain.build import load_run_config

    report = explain(load_run_config(args.config, extra))
    print(to_json(report) if args.json else render(report))
