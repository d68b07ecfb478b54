"""`gptrain compare RUN [RUN ...]`: every run's loss curves on shared axes (compare.png), and a table of what each
run reached, what it cost, and the config keys in which the runs differ: a learning-rate sweep at a glance.

Runs are read as diagnose reads them (load_run: config.yaml checked, metrics.jsonl's rows, the later row of an
iteration logged twice). "At iteration i" means before iteration i runs, for tokens and time alike: an evaluation
at iteration i judges the model after i iterations.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path

from gptrain.analysis.diagnose import Run, load_run
from gptrain.analysis.plot import pyplot
from gptrain.errors import UserError
from gptrain.runtime.files import check_output_file, kind_of, write_atomically

X_AXES = {"tokens": "tokens seen", "time": "training time (s)", "iter": "iteration"}
# Each run has a folder of its own by necessity, and the table names it already: listing it would crowd out the
# keys that explain a difference in loss.
IGNORED_KEYS = ("out_dir",)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_FIX = "give the out_dir of a gptrain run"


@dataclass
class ComparedRun:
    name: str
    run: Run
    segments: list[tuple[int, int]]  # (first iteration, tokens per iteration), one per start of the run
    clock: tuple[list[int], list[float]]  # training seconds before each of these iterations

    def tokens_at(self, it: int) -> int:
        """Tokens trained on before iteration `it`: a resume may have changed the batch, so by segments."""
        total = 0
        for k, (first, per_iter) in enumerate(self.segments):
            end = self.segments[k + 1][0] if k + 1 < len(self.segments) else math.inf
            total += per_iter * max(0, min(it, end) - (0 if k == 0 else first))
        return total

    def seconds_at(self, it: int) -> float:
        """Training seconds before iteration `it`, linear between the logged steps."""
        iters, seconds = self.clock
        k = bisect.bisect_right(iters, it)
        if k == len(iters):
            return seconds[-1]
        return seconds[k - 1] + (seconds[k] - seconds[k - 1]) * (it - iters[k - 1]) / (iters[k] - iters[k - 1])

    def x_of(self, it: int, x_axis: str) -> float:
        return {"tokens": self.tokens_at, "time": self.seconds_at, "iter": int}[x_axis](it)

    @property
    def iterations(self) -> int:
        """Iterations trained: through the last logged step, or up to an evaluation after it."""
        last_eval = self.run.evals[-1]["iter"] if self.run.evals else 0
        return max(self.run.steps[-1]["iter"] + 1, last_eval)


def token_segments(run: Run) -> list[tuple[int, int]]:
    """Each start row's tokens per iteration from its iteration on. A later start at or before an earlier one's
    iteration replaces what followed (a run resumed from an older checkpoint trained those iterations again)."""
    config = run.config
    if config.get("objective") == "dpo":
        return logged_token_segments(run.steps)
    from_config = config["gradient_accumulation_steps"] * config["batch_size"] * config["block_size"]
    segments = []
    for start in run.starts:
        segments = [s for s in segments if s[0] < start["iter"]]
        segments.append((start["iter"], start.get("tokens_per_iter") or from_config))
    return segments or [(0, from_config)]


def logged_token_segments(steps: list[dict]) -> list[tuple[int, int]]:
    """A DPO run's steps differ in size with their pairs' lengths: each logged step's rate times its time per
    iteration is the mean of the iterations it stands for (those after the logged step before it)."""
    segments, first = [], 0
    for step in steps:
        segments.append((first, round(step["tokens_per_s"] * step["ms"] / 1000)))
        first = step["iter"] + 1
    return segments


def training_clock(steps: list[dict]) -> tuple[list[int], list[float]]:
    """Training seconds before iteration i, at 0 and after each logged step. A logged step's ms is the mean time
    per iteration since the log before it (evaluations and checkpoints left out), so the step logged at
    iteration i stands for the iterations after the previous logged step up to i: its ms times their number.
    Every trained iteration then counts once, in a resumed run too: a resume cuts metrics.jsonl back to its
    checkpoint, and load_run keeps the later row of an iteration logged twice. After an evaluation the ms covers
    only the iterations since it, and is taken as the pace of the whole gap."""
    iters, seconds, previous = [0], [0.0], -1
    for step in steps:
        seconds.append(seconds[-1] + step["ms"] / 1000 * (step["iter"] - previous))
        iters.append(step["iter"] + 1)
        previous = step["iter"]
    return iters, seconds


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name; the paths as given when two folders share a name."""
    names = [path.resolve().name for path in run_dirs]  # resolved: "." has no name of its own
    return names if len(set(names)) == len(names) else [str(path) for path in run_dirs]


def load_runs(run_dirs: list[Path]) -> list[ComparedRun]:
    if not run_dirs:
        raise UserError("gptrain compare needs at least one run folder, e.g. gptrain compare out/lr1e-3 out/lr3e-3")
    seen = {}
    for path in run_dirs:
        if kind_of(path) == "dir" and path.resolve() in seen:
            earlier = seen[path.resolve()]
            same = f"{path} is given twice" if path == earlier else f"{path} and {earlier} are the same run"
            raise UserError(f"{same}; give each run once")
        seen[path.resolve()] = path
    compared = []
    for path, name in zip(run_dirs, run_names(run_dirs)):
        run = load_run(path)
        if not run.steps:
            raise UserError(f"{path}/metrics.jsonl has no training steps yet; let the run log a few iterations "
                            "or leave it out")
        compared.append(ComparedRun(name, run, token_segments(run), training_clock(run.steps)))
    return compared


def differing_keys(configs: list[dict]) -> list[str]:
    """The config keys whose values are not the same in every run, in the config's order."""
    keys = dict.fromkeys(key for config in configs for key in config)
    return [key for key in keys if key not in IGNORED_KEYS
            and any(config.get(key) != configs[0].get(key) for config in configs[1:])]


def table_row(compared: ComparedRun, keys: list[str]) -> dict:
    run = compared.run
    best = min(run.evals, key=lambda e: e["val_loss"]) if run.evals else None  # the earliest of equal losses
    tokens, seconds = compared.tokens_at(compared.iterations), compared.seconds_at(compared.iterations)
    return {
        "run": compared.name, "n_params": run.start.get("n_params"), "iterations": compared.iterations,
        "tokens": tokens, "best_val_loss": best["val_loss"] if best else None,
        "best_iter": best["iter"] if best else None, "train_seconds": seconds,
        # tokens over time rather than the median logged rate: the three columns then agree, warm-up included
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "config": {key: run.config.get(key) for key in keys},
    }


def comparison_table(runs: list[ComparedRun]) -> list[dict]:
    keys = differing_keys([compared.run.config for compared in runs])
    return [table_row(compared, keys) for compared in runs]


def check_png_output(out: Path) -> Path:
    """--out: a .png path, replacing only a PNG picture (an earlier comparison), never another file."""
    check_output_file(out, "--out")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png: gptrain compare draws a PNG picture")
    if kind_of(out) == "file":
        with open(out, "rb") as f:
            if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                raise UserError(f"--out {out} already exists and is not a PNG picture; choose another path")
    return out


def draw(runs: list[ComparedRun], x_axis: str, out: Path):
    """Train loss (thin line) and val loss (dots) of every run on one pair of axes, one colour per run; saved
    atomically to `out`. Returns the figure (its axes hold the plotted data)."""
    plt = pyplot("gptrain compare")
    fig, ax = plt.subplots(figsize=(10, 6))
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "viridis")
    for k, compared in enumerate(runs):
        colour = colours(k if len(runs) <= 10 else k / (len(runs) - 1))
        steps = [s for s in compared.run.steps if s["loss"] is not None]
        ax.plot([compared.x_of(s["iter"], x_axis) for s in steps], [s["loss"] for s in steps], lw=0.8, alpha=0.5,
                color=colour, label=compared.name)
        evals = compared.run.evals
        ax.plot([compared.x_of(e["iter"], x_axis) for e in evals], [e["val_loss"] for e in evals], "o-", ms=4,
                color=colour)
    ax.set_xlabel(X_AXES[x_axis])
    ax.set_ylabel("loss")
    ax.set_title("train loss (thin line) and val loss (dots)")
    ax.legend()
    fig.tight_layout()
    write_atomically(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return fig


def compare(run_dirs: list[Path], x_axis: str = "tokens", out: Path = Path("compare.png")):
    """Check the output path and read every run before drawing anything; returns (table rows, figure)."""
    if x_axis not in X_AXES:
        raise UserError(f"--x must be one of {', '.join(X_AXES)}, got {x_axis!r}")
    check_png_output(out)
    runs = load_runs([Path(path) for path in run_dirs])
    return comparison_table(runs), draw(runs, x_axis, out)


def _cells(row: dict) -> list[str]:
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    config = [f"{value:g}" if isinstance(value, float) else str(value) for value in row["config"].values()]
    return [row["run"], number(row["n_params"], ","), number(row["tokens"], ","),
            number(row["best_val_loss"], ".4f"), number(row["best_iter"], "d"),
            number(row["train_seconds"], ".1f"), number(row["tokens_per_s"], ",.0f"), *config]


def render(rows: list[dict]) -> str:
    header = ["run", "params", "tokens", "best val", "at iter", "time (s)", "tokens/s", *rows[0]["config"]]
    lines = [header, *(_cells(row) for row in rows)]
    widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
    # the run's name and the config values read best left-aligned, the figures right-aligned
    left = {0, *range(7, len(header))}
    return "\n".join("  ".join(cell.ljust(w) if k in left else cell.rjust(w)
                               for k, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in lines)


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)
