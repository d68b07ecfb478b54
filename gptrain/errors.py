"""Errors that are the user's to fix: the CLI prints them as one `error:` line and exits with code 2."""


class UserError(Exception):
    """Bad input (config, data, checkpoint, argument). The message says what is wrong and how to fix it."""

    exit_code = 2
