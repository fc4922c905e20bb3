"""The one exception type the command line turns into a one-line message, and a checked dataclass builder."""

import dataclasses


class MPDiTError(ValueError):
    """Bad input from the user: the message says what to fix, in one line."""


def dataclass_from_dict(cls, values: dict, what: str):
    """cls(**values), with a one-line MPDiTError naming the first key `cls` does not have ('unknown WHAT ...')."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MPDiTError(f"unknown {what} '{unknown[0]}' (known: {', '.join(sorted(known))})")
    return cls(**values)
