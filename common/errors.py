"""The one exception type for mistakes a user can fix.

The CLI prints ``str(error)`` as a single line (what is wrong, where, how to fix it) and exits
with ``error.exit_code``; no traceback. Anything else escaping is a bug in this project.
"""


class UserError(Exception):
    """Bad input or an impossible request, reported as one line."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(message.split()))  # always one line
        if exit_code is not None:
            self.exit_code = exit_code
