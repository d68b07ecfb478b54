"""`gptrain bench CONFIG`: the training step timed as `gptrain train` runs it against the bare step, MFU, and
sampling speed (gptrain/analysis/bench.py)."""

from __future__ import annotations

import json
from pathlib import Path

from gptrain.commands.args import finite_float, path_arg
from gptrain.errors import UserError
from gptrain.runtime.files import check_output_file, kind_of, write_atomically


def add_to(commands) -> None:
    bench = commands.add_parser("bench", help="measure training and sampling speed, MFU and the loop overhead",
                                description="Time the training step as gptrain train runs it against the bare "
                                            "step; --name=value overrides config keys.")
    bench.add_argument("config", help="YAML config file, or a shipped config's name")
    bench.add_argument("--iters", type=int, default=50, help="timed iterations of each kind (default 50)")
    bench.add_argument("--json", dest="json_path", type=path_arg, help="also write every figure to this JSON file")
    bench.add_argument("--profile", action="store_true", help="add torch.profiler's top operators")
    bench.add_argument("--peak_tflops", type=finite_float,
                       help="the device's peak, overriding the table or CPU probe")
    bench.add_argument("--sample_tokens", type=int, default=500, help="new tokens for the sampling figures")
    bench.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    from gptrain.analysis.bench import render, run_bench, to_json
    from gptrain.build import load_run_config

    if args.iters < 1 or args.sample_tokens < 1:
        raise UserError("--iters must be >= 1 and --sample_tokens >= 1")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UserError(f"--peak_tflops must be a positive number, got {args.peak_tflops:g}")
    if args.json_path is not None:
        check_output_file(args.json_path, "--json")
        refuse_foreign_json(args.json_path)
    result = run_bench(load_run_config(args.config, extra), args.iters, args.peak_tflops, args.profile,
                       args.sample_tokens)
    print(render(result))
    if args.json_path is not None:
        write_atomically(args.json_path, (to_json(result) + "\n").encode("utf-8"))


def refuse_foreign_json(path: Path) -> None:
    """bench --json replaces an earlier bench result, never another file."""
    kind = kind_of(path)
    if kind is None:
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")) if kind == "file" and not path.is_symlink() else None
    except (OSError, ValueError, RecursionError):
        earlier = None
    if not (isinstance(earlier, dict) and "full_step_ms" in earlier):
        raise UserError(f"--json {path} already exists and is not an earlier bench result; choose another path")
