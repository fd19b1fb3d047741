"""The eviction arithmetic of one site: how many tokens may stay once `seen` tokens have been seen.

The budget is a hard cap on bytes: at every moment the bytes a site's cache holds (K, V and
any per-token state the method keeps) are at most `fraction x` the bytes its full cache would
hold, and at most the site's token cap. Sinks and the recent window are carved out of that
cap, never added on top.

Written with `kvpass.cost`'s `smin`/`where`, so the same code gives the ints the runtime
evicts by and the sympy formulas `Plan.kv_bytes_expr` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from kvpass.cost import smax, smin, where
from kvpass.methods import Method, Stat
from kvpass.site import AttentionSite
from kvpass.validation import integer

SLOT_BYTES = 4
"""Each kept token remembers its logical position (int32) per KV head."""
STAT_BYTES = 4
"""Methods that accumulate attention keep one float32 per token and KV head."""


@dataclass(frozen=True)
class SiteSchedule:
    """How many tokens one site's cache may hold, and how many an eviction keeps.

    Every method accepts an int `seen` (the runtime) or a sympy expression (the cost model).

    Example:
        >>> s = SiteSchedule(fraction=0.5, kv_bytes_per_token=256, state_bytes_per_token=8)
        >>> s.cap(1000)   # floor(0.5 * 1000 * 256 / (256 + 8))
        484
        >>> from kvpass.cost import SEQ
        >>> s.cap(SEQ)
        floor(16*seq/33)
    """

    fraction: float
    kv_bytes_per_token: int
    state_bytes_per_token: int
    sinks: int = 4
    recent: int = 32
    evict_every: int = 1
    max_tokens: int | None = None
    """Absolute cap on the tokens held (token and byte budgets); None: only the fraction caps."""
    stat_bytes_per_token: int = 0
    """The part of `state_bytes_per_token` held from the first token on (a statistic), not only after eviction."""
    page_size: int = 1
    """Eviction granularity: kept tokens beyond sinks and window are whole pages."""

    @property
    def prunes(self) -> bool:
        return self.fraction < 1.0 or self.max_tokens is not None

    def cap(self, seen):
        """Most tokens the cache may physically hold once `seen` tokens have been seen."""
        held = seen
        if self.fraction < 1.0:
            # Exact integer arithmetic (the byte bound holds to the byte) that also works on a
            # torch SymInt `seen` (compiled with dynamic shapes), where Fraction(...) * seen cannot.
            ratio = Fraction(self.fraction)
            per_token = self.kv_bytes_per_token + self.state_bytes_per_token
            held = ratio.numerator * self.kv_bytes_per_token * seen // (ratio.denominator * per_token)
        if self.max_tokens is not None:
            held = smin(held, self.max_tokens)
        return held

    def target(self, seen):
        """Tokens to keep when evicting at `seen`, so the cap still holds after the next
        `evict_every - 1` appended tokens without another eviction: min over j < evict_every
        of `cap(seen + j) - j`.

        The cap grows by at most one token per token seen (fraction <= 1, state >= 0), so
        `cap(seen + j) - j` never increases with j and the minimum is at the last j: a closed
        form, however large `evict_every` is."""
        last = self.evict_every - 1
        return smax(0, self.cap(seen + last) - last)

    def carve_out(self, keep) -> tuple:
        """(sinks, recent) that fit inside `keep`: sinks first, then the recent window."""
        sinks = smin(self.sinks, keep)
        return sinks, smin(self.recent, keep - sinks)

    def kept(self, seen):
        """Tokens an eviction at `seen` keeps: `target`, rounded down to whole pages past the carve-outs."""
        keep = self.target(seen)
        if self.page_size > 1:
            sinks, recent = self.carve_out(keep)
            keep = sinks + recent + (keep - sinks - recent) // self.page_size * self.page_size
        return keep

    def held_bytes(self, seen, batch=1):
        """Bytes the cache holds right after a prefill of `seen` tokens (no padding), `batch` rows.

        Below its cap a cache keeps its tokens plus the statistic its method accumulates; once
        evicted, every kept token also carries its slot. A fraction below 1 always evicts
        (its cap is below `seen`), which keeps the symbolic form free of a needless branch.
        """
        stat = self.stat_bytes_per_token if self.prunes else 0
        whole = seen * (self.kv_bytes_per_token + stat)
        evicted = self.kept(seen) * (self.kv_bytes_per_token + self.state_bytes_per_token)
        evicts = True if self.fraction < 1.0 else seen > self.cap(seen)
        return batch * where(evicts, evicted, whole)


def state_bytes_per_token(site: AttentionSite, method: Method) -> tuple[int, int]:
    """(all state, statistic part) a pruned site keeps per token and sequence beside K and V."""
    stat = site.num_kv_heads * STAT_BYTES if method.stat is not Stat.NONE else 0
    return site.num_kv_heads * SLOT_BYTES + stat, stat


def check_schedule_options(sinks: Any, recent: Any, evict_every: Any) -> tuple[int, int, int]:
    """Validate the eviction knobs shared by every plan, naming the bad argument; returns them as ints."""
    return (integer(sinks, "sinks", minimum=0), integer(recent, "recent", minimum=0),
            integer(evict_every, "evict_every", minimum=1))
