"""The `gptrain` command line: the parser, built from the command modules (gptrain/commands/, one per command),
the dispatch to the command, and the way a command ends (an `error:` line and an exit code, or a traceback for
a bug)."""

from __future__ import annotations

import importlib
import os
import sys

import gptrain
from gptrain.commands.args import ArgumentParser
from gptrain.errors import CheckpointWriteError, Interrupted, TrainingHalted, UserError
from gptrain.runtime.signals import interruptible, signal_received, stop_if_signalled, stopped_within

# The commands in the order `gptrain --help` lists them, each the module of gptrain/commands/ that defines it.
COMMANDS = ("prepare", "tokenizer", "configs", "train", "sample", "chat", "serve", "eval", "bench", "diagnose",
            "plot", "compare", "explain", "grads", "import_hf", "export_hf", "export_gguf", "merge_lora")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="gptrain", description="Train small GPT language models and sample from them.")
    parser.add_argument("--version", action="version", version=f"gptrain {gptrain.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name in COMMANDS:
        importlib.import_module(f"gptrain.commands.{name}").add_to(commands)
    return parser


def check_utf8_arguments(argv: list[str]) -> None:
    """Bytes the locale cannot decode reach Python as lone surrogates: name the argument instead of failing later
    with a confusing message (an unknown character, a file not found)."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"the argument {arg.encode('utf-8', 'replace').decode()!r} is not valid UTF-8 text") \
                from None


def _refuse_extra(extra: list[str]) -> None:
    if extra:
        raise UserError(f"unrecognized arguments: {' '.join(extra)}")


def main(argv: list[str] | None = None) -> None:
    check_utf8_arguments(sys.argv[1:] if argv is None else argv)
    args, extra = build_parser().parse_known_args(argv)
    args.run(args, extra)


# How long a rank other than 0 that met an error waits for torchrun to stop it before it reports the error itself.
PEER_REPORT_GRACE_S = 15.0


def _rank() -> str:
    """This process's rank under torchrun, "0" when alone. Read from the environment rather than through a
    DistContext, which refuses a malformed RANK: this is also how that very error gets reported."""
    return os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"


def report_once(message: str) -> None:
    """Print a failure once per job. Under torchrun every rank usually meets the same error, and rank 0 reports
    it. The others wait for torchrun to stop them (it does once rank 0 exits): exiting first would make torchrun
    stop rank 0 before it had printed. An error that only this rank met is printed after the grace period."""
    rank = _rank()
    if rank == "0":
        print(message, file=sys.stderr)
    elif not stopped_within(PEER_REPORT_GRACE_S):
        print(f"{message} (rank {rank})", file=sys.stderr)


def run_guarded(entry, argv: list[str] | None = None) -> int:
    """Run a command; a UserError becomes one `error:` line on stderr and exit code 2, without a traceback.
    SIGTERM is turned into an exception like Ctrl-C's, so a command stopped by it cleans up what it started."""
    with interruptible():
        try:
            entry(argv)
            stop_if_signalled()  # a signal whose exception was lost on the way still ends the command as one
        except BaseException as exc:  # every way out is sorted below; the rest propagates
            return report_failure(exc)  # inside interruptible(): what the failure leaves half-made is freed here
    return 0


def report_failure(exc: BaseException) -> int:
    """Report how a command ended and return its exit code; an unexpected error propagates (a traceback is a bug
    to report), unless a signal came first: then whatever it became on the way out is the interruption."""
    if isinstance(exc, UserError):
        report_once(f"error: {exc}")
        return exc.exit_code
    if isinstance(exc, (TrainingHalted, CheckpointWriteError)):
        report_once(str(exc))
        return exc.exit_code
    if isinstance(exc, Interrupted):  # torchrun signals every rank: rank 0 speaks for all
        if _rank() == "0":
            print(str(exc), file=sys.stderr)
        return exc.exit_code
    signum = signal_received()
    if isinstance(exc, KeyboardInterrupt) or signum is not None:
        if _rank() == "0":
            print("terminated by SIGTERM" if signum == 15 else "interrupted", file=sys.stderr)
        return 128 + (signum or 2)
    if isinstance(exc, BrokenPipeError):  # `gptrain sample | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
    if isinstance(exc, OSError):  # a path the system refused (too long, no permission, a full disk, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        report_once(f"error: {where}{exc.strerror or exc}; check the path and its permissions")
        return 2
    raise exc


def console_main() -> None:
    sys.exit(run_guarded(main))
