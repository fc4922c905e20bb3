"""The one exception type the command line turns into a one-line message."""


class MPDiTError(ValueError):
    """Bad input from the user: the message says what to fix, in one line."""
