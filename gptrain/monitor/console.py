"""How a run reports progress: a tqdm bar on a terminal, plain log lines elsewhere (CI, files)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Console:
    """Progress when stderr is a terminal: a tqdm bar there, each logged step in its postfix. Otherwise plain lines
    on stdout.

    Plain lines to a terminal show every logged step. To anything else (a CI log, a file, `2>&1 | tee`) they are
    sparse, chosen by iteration so that a run always prints the same lines: a logged step prints when it is the
    first printed in its block of iterations (blocks of 1 below iter 10, of 10 below iter 100, of 100 from then on:
    iters 0-9, 10, 20, ..., 90, 100, 200, ... at log_interval 1), or when the next iteration evaluates or ends the
    run. A step left out is printed before the next message (evaluations, warnings, the final line: these always
    print) and at close, so the log never stops short of the latest logged step. metrics.jsonl records every one.
    """

    def __init__(self, start: int = 0, total: int = 0, bar: bool | None = None, quiet: bool = False,
                 sparse: bool | None = None, eval_interval: int | None = None):
        """quiet: say nothing at all (ranks other than 0 of a distributed run, a Trainer outside run()).
        sparse: plain lines for a log rather than a reader (default: when stdout is not a terminal)."""
        self.quiet = quiet
        self.bar = None
        if not quiet and (bar if bar is not None else sys.stderr.isatty()):
            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)
        if sparse is None:
            sparse = not quiet and self.bar is None and not sys.stdout.isatty()
        self.sparse = sparse
        self.total, self.eval_interval = total, eval_interval
        self.last_printed: int | None = None  # the iteration of the last step line printed
        self.pending: dict | None = None  # a logged step not printed (yet)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def step_logged(self, row: dict, loss: float) -> None:
        """A logged training step (its metrics row): the bar's postfix on a terminal, a printed line otherwise."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
        elif not self.quiet:
            self.pending = row
            if self.shows(row["iter"]):
                self._print_pending()

    def shows(self, it: int) -> bool:
        """Whether a logged step prints at once (the rule of the class docstring)."""
        if not self.sparse or self.last_printed is None:
            return True
        block = sparse_block(it)
        before_eval = bool(self.eval_interval) and (it + 1) % self.eval_interval == 0
        last = bool(self.total) and it + 1 >= self.total
        return it // block > self.last_printed // block or before_eval or last

    def message(self, line: str, file=None) -> None:
        """A line that is always shown (evaluations, warnings), above the bar when there is one."""
        if self.bar is not None:
            self.bar.write(line, file=file or sys.stdout)
        elif not self.quiet:
            self._print_pending()
            print(line, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.quiet:
            self._print_pending()

    def _print_pending(self) -> None:
        if self.pending is not None:
            print(format_step(self.pending), flush=True)
            self.last_printed, self.pending = self.pending["iter"], None


def sparse_block(it: int) -> int:
    """Iterations per printed step line in sparse output, by how far the run is: dense at first, when the loss
    moves fast, then one line per 100 iterations."""
    return 1 if it < 10 else 10 if it < 100 else 100


def quiet_bar(iterable, desc: str, total: int | None = None):
    """A bar for a piece of work that appears only on a terminal, and only if it lasts over two seconds."""
    return tqdm(iterable, desc=desc, total=total, delay=2.0, leave=False, disable=not sys.stderr.isatty())


def format_step(row: dict) -> str:
    """A metrics row of a step as one log line."""
    def fmt(value, spec):
        return "nan" if value is None else format(value, spec)

    update = f"update {fmt(row['update_ratio'], '.1e')}, " if "update_ratio" in row else ""
    preferred = (f"reward margin {fmt(row['rewards/margins'], '.3f')}, accuracy "
                 f"{fmt(row['rewards/accuracies'], '.0%')}, ") if "rewards/margins" in row else ""
    epoch = f"epoch {row['epoch']:.2f}, " if "epoch" in row else ""
    line = (f"iter {row['iter']}: loss {fmt(row['loss'], '.4f')}, {preferred}{epoch}lr {row['lr']:.2e}, "
            f"grad norm {fmt(row['grad_norm'], '.3f')}{' (clipped)' if row['clipped'] else ''}, "
            f"{update}time {row['ms']:.1f}ms, {row['tokens_per_s']:,.0f} tok/s")
    if "mfu" in row:
        line += f", mfu {row['mfu'] * 100:.1f}%"
    return line
