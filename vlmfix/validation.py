"""Argument checks shared by every constructor and config: one message style, raised before any work.

Each check returns the value as its plain type (float, int, bool, str, tuple) or raises `ValueError`
naming the argument, the value (with its type when the type is wrong) and, when given, what the
argument means:

    >>> number("0.1", "cutoff", low=0, high=1, low_open=True, meaning="the refinement's cutoff")
    Traceback (most recent call last):
    ...
    ValueError: `cutoff` must be a finite number in (0, 1], got '0.1' (a str); cutoff is the refinement's cutoff.

Numbers are real ints or floats (never bools, never strings, never NaN or infinite unless `finite=False`);
booleans are real bools (`bool('no')` is True, so strings are refused); sequences are lists or tuples
(never a bare string or a single number).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def with_type(value: Any) -> str:
    """`value` as an error message shows it with its type: 42 (an int), '0.1' (a str)."""
    kind = type(value).__name__
    return f"{value!r} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def _fail(name: str, requirement: str, value: Any, meaning: str, *, show_type: bool = False) -> ValueError:
    shown = with_type(value) if show_type else repr(value)
    tail = f"; {meaning}" if meaning and meaning[0].isupper() else (f"; {name} is {meaning}" if meaning else "")
    return ValueError(f"`{name}` must be {requirement}, got {shown}{tail}".rstrip(".") + ".")


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def is_number(value: Any) -> bool:
    """A real int or float (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    finite: bool = True,
    meaning: str = "",
) -> Any:
    """`value` as a float (an int with `integer=True`), checked against the interval low..high."""
    kind = "an int" if integer else ("a finite number" if finite else "a number")
    requirement = kind + _interval(low, high, low_open, high_open)
    wrong_type = not is_number(value) or (integer and not isinstance(value, int))
    if wrong_type:
        raise _fail(name, requirement, value, meaning, show_type=True)
    if finite and not math.isfinite(value):
        raise _fail(name, requirement, value, meaning)
    if value != value:  # NaN passes no interval test
        raise _fail(name, requirement, value, meaning)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise _fail(name, requirement, value, meaning)
    return int(value) if integer else float(value)


def optional_number(value: Any, name: str, **checks: Any) -> Any:
    """None, or `number(value, name, **checks)`."""
    if value is None:
        return None
    checks["meaning"] = checks.get("meaning", "") or ""
    try:
        return number(value, name, **checks)
    except ValueError as err:
        raise ValueError(str(err).replace(" must be ", " must be None or ", 1)) from None


def boolean(value: Any, name: str, meaning: str = "") -> bool:
    """`value`, which must be True or False (not a string, not 0/1)."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value, meaning, show_type=not isinstance(value, str))
    return value


def choice(value: Any, name: str, options: Iterable[Any], meaning: str = "") -> Any:
    """`value`, which must be one of `options`."""
    options = tuple(options)
    if not any(value == option and type(value) is type(option) for option in options):
        listed = ", ".join(repr(o) for o in options)
        raise _fail(name, f"one of {listed}", value, meaning)
    return value


def sequence(
    value: Any,
    name: str,
    item: Callable[[Any, str], Any],
    *,
    length: int | None = None,
    min_length: int = 0,
    unique: bool = False,
    what: str = "values",
    meaning: str = "",
) -> tuple[Any, ...]:
    """`value` (a list or tuple) as a tuple, each element checked by `item(element, f"{name}[i]")`."""
    size = f"{length} " if length is not None else ("a non-empty list of " if min_length else "a list of ")
    requirement = f"{size}{what}" if length is None else f"a list of {size}{what}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _fail(name, requirement, value, meaning, show_type=True)
    if (length is not None and len(value) != length) or len(value) < min_length:
        raise _fail(name, requirement, list(value), meaning)
    checked = tuple(item(element, f"{name}[{i}]") for i, element in enumerate(value))
    if unique and len(set(checked)) != len(checked):
        raise _fail(name, f"distinct {what}", list(value), meaning)
    return checked


def index(value: Any, name: str) -> int:
    """A non-negative int (a layer or dimension index)."""
    return number(value, name, low=0, integer=True)


def indices(
    value: Any, name: str, *, allow_none: bool = True, min_length: int = 1, what: str = "0-based layer indices",
    meaning: str = "",
) -> tuple[int, ...] | None:
    """None (when allowed) or a list of distinct non-negative ints, returned as a tuple."""
    if value is None:
        if allow_none:
            return None
        raise _fail(name, f"a list of {what}", value, meaning)
    try:
        return sequence(value, name, index, min_length=min_length, unique=True, what=what, meaning=meaning)
    except ValueError as err:
        whole = str(err).startswith(f"`{name}` must be ")  # not one element's error
        if allow_none and whole:
            raise ValueError(str(err).replace(" must be ", " must be None or ", 1)) from None
        raise


def text(value: Any, name: str, *, allow_empty: bool = False, meaning: str = "") -> str:
    """A string (non-empty unless `allow_empty`)."""
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise _fail(name, "a string" if allow_empty else "a non-empty string", value, meaning,
                    show_type=not isinstance(value, str))
    return value


def function(value: Any, name: str, signature: str, meaning: str = "") -> Callable[..., Any]:
    """A callable; `signature` says what it is called with, e.g. "(model, inputs) -> (local, summary)"."""
    if not callable(value):
        raise _fail(name, f"a callable {signature}", value, meaning, show_type=True)
    return value
