"""`gptrain diagnose RUN_DIR`: what a run's metrics say (loss flat, diverged, overfitting, slow, healthy) and the
fix (gptrain/analysis/diagnose.py)."""

from __future__ import annotations

from pathlib import Path

from gptrain.commands.args import path_arg, refuse_extra
from gptrain.runtime.files import require_dir


def add_to(commands) -> None:
    diagnose = commands.add_parser("diagnose", help="explain a run: loss flat, diverged, overfitting, slow, healthy")
    diagnose.add_argument("run_dir", type=path_arg, help="the run's out_dir (config.yaml and metrics.jsonl)")
    diagnose.add_argument("--json", action="store_true", help="print JSON instead of the report")
    diagnose.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    from gptrain.analysis.diagnose import diagnose, render, to_json

    refuse_extra(extra)
    require_dir(Path(args.run_dir), "run folder", "give the out_dir of a gptrain run")
    findings = diagnose(Path(args.run_dir))
    print(to_json(findings) if args.json else render(findings, Path(args.run_dir)))
