"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input from the user (a path, a config key, a checkpoint). The message names the problem
    and, where there is one, the fix."""
