"""Argument types for number options, shared by the commands: NaN and infinities are refused in one line
("argument --cfg-scale: nan is not a finite number"), before anything runs."""

import argparse
import math


def finite_float(text: str) -> float:
    """A float option's value; argparse reports a bad one on one line."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def finite_floats(text: str) -> tuple[float, ...]:
    """A comma list of finite numbers, e.g. 1,1.5,4 (empty items skipped)."""
    return tuple(finite_float(x) for x in text.split(",") if x.strip())
