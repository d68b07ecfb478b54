"""Page faults and time per training step with glibc's default allocator settings against the ones a CPU run
sets (gptrain.runtime.device.keep_freed_memory), side by side in one run, on a config of your choice:

    python scripts/bench_page_faults.py configs/shakespeare_char_cpu_fast.yaml

Each setting trains in its own process (mallopt cannot be undone), warm-up steps first; the figures are the
median of the rounds, which alternate between the two settings so that a change in the machine's load falls on
both. docs/measurements.md records a run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from gptrain.cli import run_guarded
from gptrain.commands.args import ArgumentParser

ONE_SETTING = """
import resource, sys, time
import gptrain.runtime.device as device
from gptrain.config import load_config
from gptrain.train import Trainer

if sys.argv[2] == "glibc-defaults":
    device.keep_freed_memory = lambda: None
trainer = Trainer(load_config(sys.argv[1], ["--out_dir=unused", "--compile=false"]))
for it in range(5):
    trainer.run_iteration(it, measure_update=False)
faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for it in range(5, 5 + int(sys.argv[3])):
    trainer.run_iteration(it, measure_update=False)
steps = int(sys.argv[3])
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps, (time.perf_counter() - start) / steps)
"""
SETTINGS = ("kept", "glibc-defaults")


def measure(config: str, setting: str, steps: int) -> tuple[float, float]:
    result = subprocess.run([sys.executable, "-c", ONE_SETTING, config, setting, str(steps)], capture_output=True,
                            text=True)
    if result.returncode:
        sys.exit(result.stderr[-2000:])
    faults, seconds = result.stdout.split()[-2:]
    return float(faults), float(seconds)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="bench_page_faults.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a config file or a shipped config's name")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both settings (default 3)")
    args = parser.parse_args(argv)
    figures = {setting: [] for setting in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            figures[setting].append(measure(args.config, setting, args.steps))
    print("| allocator | page faults per step | ms per step |\n| --- | --- | --- |")
    for setting, rounds in figures.items():
        print(f"| {setting} | {statistics.median(f for f, _ in rounds):,.0f} | "
              f"{statistics.median(s for _, s in rounds) * 1000:.1f} |")


if __name__ == "__main__":
    sys.exit(run_guarded(main))
