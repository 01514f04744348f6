"""User-facing errors: one line, no traceback, naming the file, line or field."""


class UserError(Exception):
    """A mistake in the user's input (file, flag, config field). The CLI prints
    `error: <message>` and exits with status 2 instead of a traceback."""
