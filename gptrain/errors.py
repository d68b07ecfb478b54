"""Errors that end a command with a message instead of a traceback, each with its exit code."""

import re


class UserError(Exception):
    """Bad input (config, data, checkpoint, argument). The message says what is wrong and how to fix it.
    The CLI prints it as one `error:` line and exits with code 2."""

    exit_code = 2


class TrainingHalted(Exception):
    """Training cannot usefully continue (e.g. the loss stays non-finite); the message names the likely
    cause and the fix. The CLI exits with code 3; the last good checkpoint is left as it was."""

    exit_code = 3


class CheckpointWriteError(Exception):
    """Saving failed (a full disk, a lost mount). The previous checkpoint is intact; exit code 1."""

    exit_code = 1


class Interrupted(BaseException):
    """SIGINT or SIGTERM ended the run; exit code 128 + the signal number (130, 143), as shells report it. A
    BaseException, as KeyboardInterrupt is, so no `except Exception` on the way out can swallow it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A library's error message condensed to its first sentence on one line, for an `error:` line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    first = re.split(r"(?<=[a-z)\]])\. (?=[A-Z])", text)[0]  # a sentence's end, not "197. GiB"
    return first if len(first) <= limit else first[: limit - 3] + "..."
