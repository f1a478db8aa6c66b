"""The one exception type that the CLI turns into a one-line message."""


class DefungiError(Exception):
    """A user-facing error: bad input, a missing path, a wrong option. Says what to do."""
