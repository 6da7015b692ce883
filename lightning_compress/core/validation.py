"""Argument checks shared by every public class, so every refusal reads the same way.

Each check raises :class:`ValueError` with ``"`name`=value is not supported; expected ..."``: the
argument, the value given and what is accepted. Booleans are never accepted as numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _refuse(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"`{name}`={value!r} is not supported; expected {expected}.")


def check_choice(name: str, value: Any, accepted: Sequence[str]) -> str:
    """``value`` must be one of ``accepted``."""
    if not isinstance(value, str) or value not in accepted:
        raise _refuse(name, value, f"one of {list(accepted)}")
    return value


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` must be an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _refuse(name, value, f"an int >= {minimum}")
    return value


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` must be a real number within the given bounds (closed unless ``*_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            bounds = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            bounds = f"{'<' if high_open else '<='} {high:g}"
        else:
            bounds = ""
        raise _refuse(name, value, f"a number {bounds}".rstrip())
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise _refuse(name, value, "true or false")
    return value
