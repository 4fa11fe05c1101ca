"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input from the user (a path, a config key, a checkpoint). The message names the problem
    and, where there is one, the fix."""


class Stopped(Exception):
    """The command stopped before its end on purpose (a preemption signal) after saving its progress; str(e)
    says how to continue, exit_code is what the process exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
