"""How a run reports progress: a tqdm bar on a terminal, plain log lines elsewhere (CI, files)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Console:
    def __init__(self, start: int = 0, total: int = 0, bar: bool | None = None, quiet: bool = False):
        """quiet: say nothing at all (ranks other than 0 of a distributed run, a Trainer outside run())."""
        self.quiet = quiet
        self.bar = None
        if not quiet and (bar if bar is not None else sys.stderr.isatty()):
            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def step_logged(self, row: dict, loss: float) -> None:
        """A logged training step (its metrics row): the bar's postfix on a terminal, a printed line otherwise."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
        elif not self.quiet:
            print(format_step(row), flush=True)

    def message(self, line: str, file=None) -> None:
        """A line that is always shown (evaluations, warnings), above the bar when there is one."""
        if self.bar is not None:
            self.bar.write(line, file=file or sys.stdout)
        elif not self.quiet:
            print(line, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def quiet_bar(iterable, desc: str, total: int | None = None):
    """A bar for a piece of work that appears only on a terminal, and only if it lasts over two seconds."""
    return tqdm(iterable, desc=desc, total=total, delay=2.0, leave=False, disable=not sys.stderr.isatty())


def format_step(row: dict) -> str:
    """A metrics row of a step as one log line."""
    def fmt(value, spec):
        return "nan" if value is None else format(value, spec)

    update = f"update {fmt(row['update_ratio'], '.1e')}, " if "update_ratio" in row else ""
    epoch = f"epoch {row['epoch']:.2f}, " if "epoch" in row else ""
    line = (f"iter {row['iter']}: loss {fmt(row['loss'], '.4f')}, {epoch}lr {row['lr']:.2e}, "
            f"grad norm {fmt(row['grad_norm'], '.3f')}{' (clipped)' if row['clipped'] else ''}, "
            f"{update}time {row['ms']:.1f}ms, {row['tokens_per_s']:,.0f} tok/s")
    if "mfu" in row:
        line += f", mfu {row['mfu'] * 100:.1f}%"
    return line
