"""How a run reports progress: a tqdm bar on a terminal, plain log lines elsewhere (CI, files)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class ProgressReporter:
    def __init__(self, start: int, total: int, bar: bool | None = None, quiet: bool = False):
        """quiet: say nothing at all (ranks other than 0 of a distributed run)."""
        self.quiet = quiet
        self.bar = None
        if not quiet and (bar if bar is not None else sys.stderr.isatty()):
            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def step_logged(self, line: str, loss: float, tokens_per_s: float) -> None:
        """A logged training step: the bar's postfix on a terminal, a printed line otherwise."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        elif not self.quiet:
            print(line, flush=True)

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
