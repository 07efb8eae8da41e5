"""The one exception type users see: a sentence saying what went wrong, where, and what to do."""


class LmforgeError(Exception):
    """A user-facing error (bad path, corrupt file, invalid value). The CLI prints it as one line, exit 2."""
