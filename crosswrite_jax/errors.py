"""The one exception type for bad input: the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (config, paths, checkpoints): the message says what and how to fix it."""
