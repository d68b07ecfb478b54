"""Errors that end a command with a message instead of a traceback."""


class UserError(Exception):
    """Bad input (config, data, checkpoint, argument). The message says what is wrong and how to fix it.
    The CLI prints it as one `error:` line and exits with code 2."""

    exit_code = 2


class TrainingHalted(Exception):
    """Training cannot usefully continue (e.g. the loss stays non-finite); the message names the likely
    cause and the fix. The CLI exits with code 3; the last good checkpoint is left as it was."""

    exit_code = 3
