"""Check the fast CPU recipe's claim: the reference's final validation loss in at most 25% of its time.

    python scripts/speedrun.py                       # both recipes, seeds 1337 1338 1339
    python scripts/speedrun.py --seeds 1 --fast configs/my_recipe.yaml --name=value ...

Each recipe trains once per seed in a fresh process, evaluates over 200 batches only at its start and its end
(the same data and block size for both), and is timed by its own training clock (evaluations excluded). A recipe
that compiles runs one untimed iteration first, so every seed finds its compiled graphs in torch.compile's cache. The
target is the reference's mean final val loss; the fast recipe meets the claim when its mean final val loss is at
or below the target and its mean training time at most 25% of the reference's. Extra --name=value arguments
override the fast recipe's config (handy for trying changes).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

from gptrain.cli import run_guarded
from gptrain.config import load_config
from gptrain.monitor.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TIME_SHARE = 0.25
EVAL_ITERS = 200


def train(config: Path, out_dir: Path, args: list[str], overrides: list[str]) -> str:
    """`gptrain train` in a fresh process, this script's own arguments after the overrides (a warm-up stays one
    iteration, evaluations stay at the start and the end); its stdout, or exit with its error."""
    command = [sys.executable, "-m", "gptrain", "train", str(config), *overrides, f"--out_dir={out_dir}",
               "--overwrite", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def run(config: Path, seed: int, out_dir: Path, overrides: list[str]) -> dict:
    max_iters = load_config(config, overrides).max_iters
    stdout = train(config, out_dir, [f"--seed={seed}", f"--eval_iters={EVAL_ITERS}", f"--eval_interval={max_iters}"],
                   overrides)
    done = re.search(r"done: (\d+) iterations in [\d.]+s of training \(([\d.]+) ms/iter\)", stdout)
    rows = read_metrics(out_dir / "metrics.jsonl")
    final = [r for r in rows if "val_loss" in r][-1]
    start = next(r for r in rows if r.get("event") == "start")
    iters = int(done.group(1))
    return {"iters": iters, "seconds": iters * float(done.group(2)) / 1000, "val_loss": final["val_loss"],
            "tokens": iters * start["tokens_per_iter"]}


def warm_compile_cache(config: Path, out_dir: Path, overrides: list[str]) -> None:
    """One untimed iteration of a recipe that compiles, so torch.compile's on-disk cache holds its graphs before
    the timed runs: otherwise the first seed alone pays the one-time compile (~8 s on a 2-core CPU, against
    ~0.4 s from the cache) and the seeds are not timed alike."""
    if load_config(config, overrides).compile is True:
        train(config, out_dir, ["--max_iters=1", "--eval_iters=1"], overrides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=ROOT / "configs" / "shakespeare_char_cpu.yaml")
    parser.add_argument("--fast", type=Path, default=ROOT / "configs" / "shakespeare_char_cpu_fast.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "speedrun")
    parser.add_argument("--skip_reference", action="store_true", help="fast recipe only (for trying changes)")
    args, overrides = parser.parse_known_args(argv)
    recipes = [("fast", args.fast, overrides)] if args.skip_reference else [
        ("reference", args.reference, []), ("fast", args.fast, overrides)]
    results = {name: [] for name, _, _ in recipes}
    for name, config, extra in recipes:
        warm_compile_cache(config, args.out / f"{name}_warm_up", extra)
    print(f"{'recipe':<10} {'seed':>5} {'iters':>6} {'tokens':>10} {'train s':>8} {'final val':>9}")
    for seed in args.seeds:
        for name, config, extra in recipes:
            r = run(config, seed, args.out / f"{name}_{seed}", extra)
            results[name].append(r)
            print(f"{name:<10} {seed:>5} {r['iters']:>6} {r['tokens']:>10,} {r['seconds']:>8.1f} {r['val_loss']:>9.4f}",
                  flush=True)
    fast_time = statistics.mean(r["seconds"] for r in results["fast"])
    fast_val = statistics.mean(r["val_loss"] for r in results["fast"])
    print(f"fast: mean final val {fast_val:.4f} in {fast_time:.1f} s")
    if "reference" in results:
        target = statistics.mean(r["val_loss"] for r in results["reference"])
        ref_time = statistics.mean(r["seconds"] for r in results["reference"])
        share = fast_time / ref_time
        met = fast_val <= target and share <= TIME_SHARE
        print(f"reference: mean final val {target:.4f} (the target) in {ref_time:.1f} s")
        print(f"fast recipe: {share * 100:.0f}% of the reference's time, final val {fast_val:.4f} vs target "
              f"{target:.4f}: claim {'met' if met else 'NOT met'} (needs <= {TIME_SHARE * 100:.0f}% and <= target)")


if __name__ == "__main__":
    sys.exit(run_guarded(main))
