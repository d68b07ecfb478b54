"""Errors that end a command with a message instead of a traceback, each with its exit code."""

import json
import signal
from pathlib import Path


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


class Interrupted(Exception):
    """SIGINT or SIGTERM ended the run; exit code 128 + the signal number (130, 143), as shells report it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.signal_name = signal.Signals(signum).name


def read_json_file(path: Path, if_missing: str, if_invalid: str) -> dict:
    """A user-supplied JSON file, or a UserError naming the file and the fix (`if_missing`, `if_invalid`)."""
    if not path.is_file():
        raise UserError(f"{path} {if_missing}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); {if_invalid}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} must hold a JSON object; {if_invalid}")
    return value
