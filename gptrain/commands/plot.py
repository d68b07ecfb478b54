"""`gptrain plot RUN_DIR`: the run's curves in RUN_DIR/training.png (gptrain/analysis/plot.py)."""

from __future__ import annotations

from pathlib import Path

from gptrain.commands.args import path_arg, refuse_extra
from gptrain.runtime.files import require_dir
from gptrain.runtime.rundir import RunDir


def add_to(commands) -> None:
    plot = commands.add_parser("plot", help="draw RUN_DIR/training.png (needs gptrain[plot])")
    plot.add_argument("run_dir", type=path_arg, help="the run's out_dir")
    plot.add_argument("--log", action="store_true", help="log-scale loss axis")
    plot.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    from gptrain.analysis.plot import plot_run

    refuse_extra(extra)
    require_dir(Path(args.run_dir), "run folder", "give the out_dir of a gptrain run")
    plot_run(Path(args.run_dir), log_scale=args.log)
    print(f"wrote {RunDir(args.run_dir).plot}")
