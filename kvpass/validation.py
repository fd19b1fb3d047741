"""Checking option values where they are given, with one message shape for every option.

Every public option (a method's `span`, `Evict(evict_every=...)`, `PruneHeads(fraction=...)`,
a generator's `max_new_tokens`) is checked when it is given, not where it is first used deep
inside a kernel: the error names the option, what was expected and what came. Numbers from
numpy count as numbers (`np.int64(4)`, `np.float32(0.5)`) and come back as plain Python
ones, so they save to JSON; bools are not numbers here (`span=True` is a mistake).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def integer(value: Any, name: str, minimum: int | None = None, meaning: str = "") -> int:
    """`value` as a plain int, at least `minimum`; ValueError naming `name` (and what it means) otherwise.

    Example:
        >>> integer(3, "span", minimum=0)
        3
        >>> integer(2.5, "page_size", minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: page_size must be an int >= 1, got 2.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        expected = "an int" if minimum is None else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {expected}{_meaning(meaning)}, got {value!r}")
    return int(value)


def real(value: Any, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
         meaning: str = "") -> float:
    """`value` as a float within [low, high] (`low_open` / `high_open` exclude the ends); NaN,
    infinities, bools and non-numbers are refused with a ValueError naming `name`.

    Example:
        >>> real(0.25, "fraction", 0.0, 1.0, high_open=True)
        0.25
        >>> real(float("nan"), "budget", 0.0, 1.0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: budget must be a number in (0, 1], got nan
    """
    number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not number or (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}{_meaning(meaning)}, got {value!r}")
    return float(value)


def boolean(value: Any, name: str) -> bool:
    """`value` when it is a bool (numpy's included); ValueError naming `name` otherwise.

    Example:
        >>> boolean("yes", "per_head")
        Traceback (most recent call last):
        ...
        ValueError: per_head must be True or False, got 'yes'
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _meaning(meaning: str) -> str:
    return f" ({meaning})" if meaning else ""
