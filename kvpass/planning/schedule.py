"""The eviction arithmetic of one site: how many tokens may stay once `seen` tokens have been seen.

The budget is a hard cap on bytes: at every moment the bytes a site's cache holds (K, V and
any per-token state the method keeps) are at most `fraction x` the bytes its full cache would
hold, and at most the site's token cap. Sinks and the recent window are carved out of that
cap, never added on top. State a transform keeps per sequence rather than per token (token
filtering's anchors, `reserved_bytes`) is carved out of it too.

Written with `kvpass.cost`'s `smin`/`where`, so the same code gives the ints the runtime
evicts by and the sympy formulas `Plan.kv_bytes_expr` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import sympy

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
    reserved_bytes: int = 0
    """Bytes per sequence held beside the tokens (token filtering's anchors): a pruning schedule
    takes them off its cap, once the cap is large enough to hold them (`holds_reserve`)."""
    window: int | None = None
    """Most past tokens the unmodified site keeps (a sliding-window or chunked layer); None: all."""
    shared: "WindowShare | None" = None
    """How this site shares the budget with the model's windowed sites (hybrid models)."""

    @property
    def prunes(self) -> bool:
        return self.fraction < 1.0 or self.max_tokens is not None

    def token_arithmetic(self) -> tuple:
        """What decides how many tokens the cache holds and keeps, byte sizes as ratios to the K/V
        bytes: sites with equal values hold the same tokens at every length (layers of different
        head counts under one budget do)."""
        kv = self.kv_bytes_per_token
        return (self.fraction, Fraction(self.state_bytes_per_token, kv), Fraction(self.stat_bytes_per_token, kv),
                Fraction(self.reserved_bytes, kv), self.sinks, self.recent, self.evict_every, self.max_tokens,
                self.page_size, self.window, self.shared)

    def full(self, seen):
        """Tokens the unmodified site holds once `seen` tokens have been seen."""
        return seen if self.window is None else smin(seen, self.window)

    def cap(self, seen):
        """Most tokens the cache may physically hold once `seen` tokens have been seen."""
        held = self.full(seen)
        per_token = self.kv_bytes_per_token + self.state_bytes_per_token
        if self.fraction < 1.0:
            # Exact integer arithmetic (the byte bound holds to the byte) that also works on a
            # torch SymInt `seen` (compiled with dynamic shapes), where Fraction(...) * seen cannot.
            # Numerator and denominator are both scaled by the fraction's denominator.
            ratio = Fraction(self.fraction)
            budget = ratio.numerator * self.kv_bytes_per_token * held
            if self.reserved_bytes:
                held = smax(0, (budget - ratio.denominator * self.reserved_bytes) // (ratio.denominator * per_token))
            else:
                held = budget // (ratio.denominator * per_token)
        if self.shared is not None:  # a hybrid model whose windowed sites keep their whole window
            whole = self.full(seen) if self.window is not None else (
                (Fraction(self.fraction) * self.kv_bytes_per_token * seen
                 - self.shared.overhead(seen) * Fraction(self.fraction) * self.kv_bytes_per_token
                 / self.shared.full_bytes) // per_token)
            held = where(self.shared.whole(seen), whole, held)
        if self.max_tokens is not None:
            held = smin(held, self.max_tokens)
        return held

    def holds_reserve(self, seen):
        """Whether the cap leaves room for `reserved_bytes` once `seen` tokens have been seen: always
        when the schedule does not cap by fraction (at budget 1 nothing is capped; an absolute
        budget took the reserve off its token caps when it was planned)."""
        if self.fraction >= 1.0:
            return True
        ratio = Fraction(self.fraction)
        return ratio.numerator * self.kv_bytes_per_token * self.full(seen) >= ratio.denominator * self.reserved_bytes

    def keeps_window(self, seen) -> bool:
        """Whether only the window bounds this site at `seen` (it evicts its oldest tokens, nothing else)."""
        if self.window is None or self.max_tokens is not None:
            return False
        return self.fraction >= 1.0 or (self.shared is not None and bool(self.shared.whole(seen)))

    def target(self, seen):
        """Tokens to keep when evicting at `seen`, so the cap still holds after the next
        `evict_every - 1` appended tokens without another eviction: min over j < evict_every
        of `cap(seen + j) - j`.

        Without a shared window the cap grows by at most one token per token seen (fraction <= 1,
        state >= 0), so `cap(seen + j) - j` never increases with j and the minimum is at the last
        j: a closed form, however large `evict_every` is. A hybrid model's cap can jump when its
        windowed sites fill up, so there every j is checked."""
        if self.shared is not None:
            return smax(0, smin(*(self.cap(seen + j) - j for j in range(self.evict_every))))
        last = self.evict_every - 1
        return smax(0, self.cap(seen + last) - last)

    def carve_out(self, keep) -> tuple:
        """(sinks, recent) that fit inside `keep`: sinks first, then the recent window."""
        sinks = smin(self.sinks, keep)
        return sinks, smin(self.recent, keep - sinks)

    def kept(self, seen):
        """Tokens an eviction at `seen` keeps: `target`, rounded down to whole pages past the carve-outs
        (a site only its window bounds keeps exactly its window)."""
        if not isinstance(seen, sympy.Basic) and self.keeps_window(seen):
            return self.cap(seen)
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
        whole = self.full(seen) * (self.kv_bytes_per_token + stat)
        evicted = self.kept(seen) * (self.kv_bytes_per_token + self.state_bytes_per_token)
        evicts = True if self.fraction < 1.0 else seen > self.cap(seen)
        reserve = where(self.holds_reserve(seen), self.reserved_bytes, 0) if self.reserved_bytes else 0
        return batch * (where(evicts, evicted, whole) + reserve)


@dataclass(frozen=True)
class WindowShare:
    """The budget of a hybrid model (full-attention sites beside sliding-window or chunked ones).

    The cap is global: all sites together hold at most the budget of what the unmodified model
    holds, its windowed sites counted at their window. The windowed sites keep their whole window
    whenever the full-attention sites can pay for it and still keep at least `floor` of their own
    share; the full sites then hold their share minus that `overhead`, spread in proportion to
    their shares. Otherwise (short sequences, where a window is no smaller than the sequence)
    every site evicts to its own fraction. Both hold the cap exactly, at every length.

    Example:
        >>> share = WindowShare(full_bytes=Fraction(64), windows=((8, Fraction(68)),))
        >>> share.whole(8), share.whole(100)   # 8 tokens: the window costs more than the full sites' half
        (False, True)
    """

    full_bytes: Fraction
    """Bytes per token the budget grants all full-attention sites together (sum of fraction x KV bytes)."""
    windows: tuple[tuple[int, Fraction], ...]
    """(window, bytes per token above its own budget share) of each windowed site kept whole."""
    floor: Fraction = Fraction(1, 2)

    def overhead(self, seen):
        """Bytes the windowed sites hold above their budget share when kept whole."""
        return sum(extra * smin(seen, window) for window, extra in self.windows)

    def whole(self, seen):
        """Whether the windowed sites keep their whole window once `seen` tokens have been seen."""
        return self.overhead(seen) <= (1 - self.floor) * self.full_bytes * seen


def state_bytes_per_token(site: AttentionSite, method: Method) -> tuple[int, int]:
    """(all state, statistic part) a pruned site keeps per token and sequence beside K and V."""
    stat = site.num_kv_heads * STAT_BYTES if method.stat is not Stat.NONE else 0
    return site.num_kv_heads * SLOT_BYTES + stat, stat


def check_schedule_options(sinks: Any, recent: Any, evict_every: Any) -> tuple[int, int, int]:
    """Validate the eviction knobs shared by every plan, naming the bad argument; returns them as ints."""
    return (integer(sinks, "sinks", minimum=0), integer(recent, "recent", minimum=0),
            integer(evict_every, "evict_every", minimum=1))
