"""Parsing budgets: a fraction of the full cache, a token count, or a byte size.

Users think of a KV budget in whichever unit their constraint comes in: "keep half"
(a fraction), "as much as 2048 tokens of full cache" (a context length they can afford),
or "1.5GiB" (the memory they have). All three end up as a hard byte cap; this module only
turns what was written into one `Budget` value, so every verb accepts the same spellings
and refuses the same mistakes with the same message.

A bare number is always a fraction in (0, 1]: `budget=1` and `budget=1.0` both mean the
full cache, and a bare number above 1 is an error (it is ambiguous: tokens? bytes?).
Token and byte budgets are per sequence (one batch row).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Literal

BYTE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SPELLING = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)
_EXPECTED = "a fraction in (0, 1], a token count per sequence ('2048 tokens') or a byte size ('1.5GiB', '512MB')"


@dataclass(frozen=True)
class Budget:
    """A parsed budget: `kind` says what `value` counts.

    Example:
        >>> parse_budget("1.5GiB")
        Budget(kind='bytes', value=1610612736, text='1.5GiB')
        >>> parse_budget(1).value
        1.0
        >>> import numpy as np; parse_budget(np.float32(0.5))
        Budget(kind='fraction', value=0.5, text='0.5')
    """

    kind: Literal["fraction", "tokens", "bytes"]
    value: float | int
    text: str
    """The budget as the user wrote it, for messages and saved plans."""

    def bytes_per_sequence(self, kv_bytes_per_token: int) -> int:
        """The byte cap this absolute budget sets for one sequence whose full cache costs
        `kv_bytes_per_token` per token (all sites together)."""
        if self.kind == "fraction":
            raise ValueError(f"budget={self.text!r} is a fraction: it has no byte size without a sequence length")
        return self.value * kv_bytes_per_token if self.kind == "tokens" else self.value


def parse_budget(budget: Any) -> Budget:
    """A `Budget` from a float/int fraction, an existing `Budget`, or a string with a unit.

    Example:
        >>> parse_budget("2048 tokens").value, parse_budget("512MB").value
        (2048, 512000000)
    """
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, str):
        return _parse_text(budget)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):  # numpy scalars are numbers too
        raise TypeError(f"budget must be {_EXPECTED}, got {budget!r}")
    value = float(budget)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"budget must be in (0, 1] (the fraction of KV-cache bytes kept), got {budget!r}; "
            "write an absolute budget with its unit, e.g. '2048 tokens' or '512MB'"
        )
    return Budget("fraction", value, str(budget))


def _parse_text(text: str) -> Budget:
    match = _SPELLING.match(text)
    if match is None:
        raise ValueError(f"budget={text!r} is not {_EXPECTED}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit in ("token", "tokens"):
        if number != int(number) or number < 1:
            raise ValueError(f"budget={text!r}: a token budget must be a whole number of tokens >= 1")
        return Budget("tokens", int(number), text)
    if unit not in BYTE_UNITS:
        raise ValueError(f"budget={text!r} has an unknown unit {match.group(2)!r}; expected tokens or one of "
                         f"B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    size = math.floor(number * BYTE_UNITS[unit])
    if size < 1:
        raise ValueError(f"budget={text!r} is less than one byte")
    return Budget("bytes", size, text)
