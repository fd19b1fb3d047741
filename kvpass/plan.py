"""Plans: how much of each site's KV cache survives, and the arithmetic that enforces it.

A `Plan` maps every attention site to a budget fraction. `budget=0.5` is a hard cap on
bytes: at every moment, the bytes a site's cache holds (K, V and any per-token state the
method keeps) are at most `fraction x` the bytes the full cache would hold. Sinks and the
recent window are carved out of that cap, never added on top.

Uniform allocation is the default (`uniform_plan`); allocators are plain functions from
sites to budgets, so a cost-model allocator can replace it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvpass.methods import Method, Stat
from kvpass.site import AttentionSite

SLOT_BYTES = 4
"""Each kept token remembers its logical position (int32) per KV head."""
STAT_BYTES = 4
"""Methods that accumulate attention keep one float32 per token and KV head."""


@dataclass(frozen=True)
class SiteSchedule:
    """The eviction arithmetic of one site: how many tokens may stay after `seen` tokens.

    Example:
        >>> s = SiteSchedule(fraction=0.5, kv_bytes_per_token=256, state_bytes_per_token=8)
        >>> s.cap(1000)   # floor(0.5 * 1000 * 256 / (256 + 8))
        484
    """

    fraction: float
    kv_bytes_per_token: int
    state_bytes_per_token: int
    sinks: int = 4
    recent: int = 32
    evict_every: int = 1

    @property
    def prunes(self) -> bool:
        return self.fraction < 1.0

    def cap(self, seen: int) -> int:
        """Most tokens the cache may physically hold once `seen` tokens have been seen."""
        if not self.prunes:
            return seen
        per_token = self.kv_bytes_per_token + self.state_bytes_per_token
        return min(seen, math.floor(self.fraction * seen * self.kv_bytes_per_token / per_token))

    def target(self, seen: int) -> int:
        """Tokens to keep when evicting at `seen`, so the cap still holds after the next
        `evict_every - 1` appended tokens without another eviction."""
        return max(0, min(self.cap(seen + j) - j for j in range(self.evict_every)))

    def carve_out(self, keep: int) -> tuple[int, int]:
        """(sinks, recent) that fit inside `keep`: sinks first, then the recent window."""
        sinks = min(self.sinks, keep)
        return sinks, min(self.recent, keep - sinks)


@dataclass
class Plan:
    """A budget fraction per attention site, and the method that realises it.

    Example:
        >>> from kvpass.methods import get_method
        >>> site = AttentionSite("layers.0.attn", 0, 4, 2, 16, None, True)
        >>> plan = uniform_plan([site], 0.5, get_method("h2o"))
        >>> plan.budgets
        {'layers.0.attn': 0.5}
    """

    method: Method
    budgets: dict[str, float]
    sinks: int = 4
    recent: int = 32
    evict_every: int = 1
    allocation: str = "uniform"
    notes: dict[str, str] = field(default_factory=dict)

    def schedule(self, site: AttentionSite, dtype_bytes: int) -> SiteSchedule:
        """The eviction arithmetic for `site` with a cache stored in `dtype_bytes`-wide elements."""
        fraction = self.budgets[site.name]
        state = 0
        if fraction < 1.0:
            state = site.num_kv_heads * (SLOT_BYTES + (STAT_BYTES if self.method.stat is not Stat.NONE else 0))
        return SiteSchedule(
            fraction=fraction,
            kv_bytes_per_token=site.kv_bytes_per_token(dtype_bytes),
            state_bytes_per_token=state,
            sinks=self.sinks,
            recent=self.recent,
            evict_every=self.evict_every,
        )


def uniform_plan(sites: list[AttentionSite], budget: float, method: Method, **options) -> Plan:
    """Every site gets the same fraction: the default until a cost model says otherwise."""
    return Plan(method=method, budgets={site.name: budget for site in sites}, allocation="uniform", **options)
