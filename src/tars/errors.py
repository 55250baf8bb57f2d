"""User-facing errors.

A `UserError` is a mistake in what the user gave us (a file, a field, a flag). The CLI prints its
message on one line and exits with status 2, with no traceback. An operating-system error about a named
file (an `--out` that is a folder, no write permission) is printed as one line naming it, status 1;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; `str(err)` is the whole one-line message."""

    exit_code = 2
