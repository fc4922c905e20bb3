"""The one exception type the command line turns into a one-line message, a checked dataclass builder, and checks
of numbers (finite) and dataclass fields (typed)."""

import dataclasses
import math
import types
import typing


class MPDiTError(ValueError):
    """Bad input from the user: the message says what to fix, in one line."""


def _describe(annotation) -> str:
    """'an integer', 'a number or null', 'a list of numbers'... for a field annotation."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s" if args else "a list"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _fits(value, annotation) -> bool:
    """Whether a JSON-like value has the type a dataclass field declares (int, float, bool, str, X | None,
    tuple[T, ...]; a tuple of strings may also be given as one string). Other annotations accept anything."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is tuple:
        if args and args[0] is str and isinstance(value, str):
            return True
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    return True


def nonfinite_number(value, where: str = "") -> tuple[str, float] | None:
    """(where, number) of the first NaN or infinity in ``value``: a number, or at any depth of dicts, lists and
    tuples (``where``: the path to it, e.g. 'metrics.fd' or 'cfg_scales[1]'); None if every number is finite."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "the value", value)
    if isinstance(value, dict):
        items = ((f"{where}.{key}" if where else str(key), item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{where}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    return next((bad for bad in (nonfinite_number(item, path) for path, item in items) if bad), None)


def _check_field(what: str, name: str, value, annotation) -> None:
    """MPDiTError if ``value`` does not fit the field's annotation or holds a NaN or an infinity."""
    if not _fits(value, annotation):
        raise MPDiTError(f"{what} '{name}' must be {_describe(annotation)}, got {value!r}")
    bad = nonfinite_number(value, name)
    if bad:
        raise MPDiTError(f"{what} '{bad[0]}' must be a finite number, got {bad[1]}")


def require_field_types(obj, what: str) -> None:
    """The checks of dataclass_from_dict (each field's type; numbers finite) for a dataclass built directly (the
    Python API, huggingface_hub's config decoding): call it first in __post_init__."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        _check_field(what, field.name, getattr(obj, field.name), hints[field.name])


def dataclass_from_dict(cls, values: dict, what: str):
    """cls(**values), with a one-line MPDiTError if ``values`` is not a dict ('... must be a JSON object'), names
    a key `cls` does not have ('unknown WHAT ...'), or gives a value of the wrong type ('WHAT 'k' must be ...')."""
    if not isinstance(values, dict):
        raise MPDiTError(f"{what}s must come as a JSON object of key: value, got a {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise MPDiTError(f"unknown {what} '{unknown[0]}' (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        _check_field(what, name, value, hints[name])
    return cls(**values)
