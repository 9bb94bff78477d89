"""Argument checks shared by every validated constructor: errors name the field."""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_int(value: Any) -> bool:
    """True for real integers (Python or numpy), False for bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_int(name: str, value: Any, minimum: int | None = None) -> int:
    """`value` as an int (bool rejected), at least `minimum` when given."""
    if not is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def require_float(name: str, value: Any) -> float:
    """`value` as a finite float (int/float accepted; bool, str, NaN and infinities rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return result
