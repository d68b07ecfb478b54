"""What run tracking costs the training loop: the CPU recipe with and without --log_to, side by side.

    python scripts/tracking_cost.py                                   # both trackers, 4 pairs of 600 iterations
    python scripts/tracking_cost.py --log_to tensorboard --pairs 6 --log_interval 10

Runs alternate (plain, tracked, plain, tracked, ...) so that a drift of the machine's speed falls on both sides;
W&B runs offline. Each run's pace is its mean ms/iter over the logged steps after the first 50 iterations (start-up
excluded), read from its metrics.jsonl. Prints each pair and the cost: tracked / plain - 1, over the means.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gptrain.monitor.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
SKIP_ITERS = 50


def pace(config: str, out_dir: Path, iters: int, log_interval: int, log_to: str | None) -> float:
    command = [sys.executable, "-m", "gptrain", "train", config, f"--out_dir={out_dir}", f"--max_iters={iters}",
               f"--lr_decay_iters={iters}", "--eval_interval=100000", f"--log_interval={log_interval}", "--overwrite"]
    if log_to:
        command.append(f"--log_to=[{log_to}]")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    rows = read_metrics(out_dir / "metrics.jsonl")
    return statistics.mean(r["ms"] for r in rows if "loss" in r and r["iter"] >= SKIP_ITERS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shakespeare_char_cpu.yaml")
    parser.add_argument("--log_to", default="tensorboard,wandb", help="the trackers, comma-separated")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--log_interval", type=int, default=1)
    args = parser.parse_args(argv)
    plain, tracked = [], []
    with tempfile.TemporaryDirectory() as folder:
        for pair in range(args.pairs):
            plain.append(pace(args.config, Path(folder) / f"plain{pair}", args.iters, args.log_interval, None))
            tracked.append(pace(args.config, Path(folder) / f"tracked{pair}", args.iters, args.log_interval,
                                args.log_to))
            print(f"pair {pair + 1}: plain {plain[-1]:.2f} ms/iter, with {args.log_to} {tracked[-1]:.2f} ms/iter",
                  flush=True)
    cost = statistics.mean(tracked) / statistics.mean(plain) - 1
    print(f"log_to [{args.log_to}] at log_interval {args.log_interval}: {statistics.mean(plain):.2f} -> "
          f"{statistics.mean(tracked):.2f} ms/iter ({cost:+.1%}) over {args.pairs} pairs of {args.iters} iterations")


if __name__ == "__main__":
    main()
