"""Decoding-time re-allocation: move a plan's budget between sites while generating.

A plan's shares are chosen before the first token, from calibration prompts; the queries
that actually arrive may lean on some layers' caches more than calibration predicted
(Lethe's time-adaptive budgets, seed §2.3). With `Plan.reallocate = N`, every N decoded
tokens each site measures, for the query of that step over its current cache ranked as
eviction ranks it, how the attention output's error grows as the lowest-ranked tokens
are dropped (`kvpass.eviction_cost.output_errors`). The same allocator as planning
(`kvpass.plan.spread`) then re-spreads the same total bytes between the sites, each
within the plan's floor and ceiling.

A cache can show what shrinking costs, not what growing would give (the tokens a larger
budget would have kept are gone), so a site's curve is continued past its current size
with the mean slope over its last-ranked eighth of kept tokens: the next tokens it would
keep are taken to be worth what its last kept ones are. Sites whose lowest-ranked tokens still carry weight grow;
sites with a flat tail give way.

The byte budget holds at every moment: shrinking sites take their new fraction at the
next step (and evict then), growing sites one step later, after every shrink happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvpass.eviction_cost import GRID, output_errors
from kvpass.planning import Plan, curve_at, spread

TAIL = GRID // 8
"""The last-ranked share of a cache (in grid steps) whose slope extrapolates growth."""
_BELOW_ONE = math.nextafter(1.0, 0.0)
"""A pruning site keeps pruning: its slots and statistic stay allocated, so its fraction stays below 1."""


@dataclass(frozen=True)
class ReallocationPolicy:
    """What re-allocation needs from a plan, for sites in the order their caches are indexed."""

    every: int
    fraction: float
    floor: float
    ceiling: float
    weights: list[int]
    shares: list[float]

    @classmethod
    def from_plan(cls, plan: Plan, names: list[str], dtype_bytes: int) -> "ReallocationPolicy":
        sites = {site.name: site for site in plan.sites}
        if set(names) - set(sites):
            raise ValueError(f"plan has no geometry for sites {sorted(set(names) - set(sites))}: re-allocation needs it")
        weights = [sites[name].kv_bytes_per_token(dtype_bytes) for name in names]
        shares = [plan.budgets[name] for name in names]
        fraction = sum(s * w for s, w in zip(shares, weights)) / sum(weights)
        return cls(plan.reallocate, fraction, min(plan.floor, fraction), min(plan.ceiling, _BELOW_ONE),
                   weights, shares)


class Reallocator:
    """The moving shares of one generation; every site cache of one model cache shares it.

    Example:
        >>> policy = ReallocationPolicy(every=4, fraction=0.5, floor=0.25, ceiling=0.9, weights=[1, 1],
        ...                             shares=[0.5, 0.5])
        >>> r = Reallocator(policy)
        >>> r.observe(0, [1.0 - q / GRID for q in range(GRID + 1)], seen=8)   # steep: every token matters
        >>> r.observe(1, [0.0] * (GRID + 1), seen=8)                          # flat: nothing does
        >>> r.fraction(1, 9) < 0.5, r.fraction(0, 9) == 0.5, r.fraction(0, 10) > 0.5
        (True, True, True)
    """

    def __init__(self, policy: ReallocationPolicy):
        self.policy = policy
        self.shares = list(policy.shares)
        self.raised: dict[int, float] = {}
        self.raise_at = 0
        self.curves: dict[int, list[float]] = {}
        self.moves = 0
        """How many re-allocations happened."""

    def due(self, seen: int, new: int) -> bool:
        """Whether the step that brought the cache to `seen` tokens (adding `new`) is a measuring step."""
        return new == 1 and seen % self.policy.every == 0

    def fraction(self, index: int, seen: int) -> float:
        """The fraction site `index` holds at the step that brings it to `seen` tokens."""
        if self.raised and seen >= self.raise_at:
            for site, share in self.raised.items():
                self.shares[site] = share
            self.raised.clear()
        return self.shares[index]

    def observe(self, index: int, errors: list[float], seen: int) -> None:
        """Site `index`'s output error at kept fractions 0, 1/GRID, ..., 1 of its current cache;
        once every site has reported for this step, the budget is re-spread."""
        self.curves[index] = errors
        if len(self.curves) == len(self.shares):
            self._respread(seen)

    def _respread(self, seen: int) -> None:
        policy = self.policy
        utilities = [_share_utility(self.curves[i], share) for i, share in enumerate(self.shares)]
        target = spread(utilities, [1.0] * len(utilities), policy.fraction, policy.floor, policy.ceiling,
                        policy.weights)
        self.raised.clear()  # a raise not yet in force is superseded by the new target
        for i, share in enumerate(target):
            if share < self.shares[i]:
                self.shares[i] = share
            elif share > self.shares[i]:
                self.raised[i] = share
        self.raise_at = seen + 2
        self.curves.clear()
        self.moves += 1


def _share_utility(errors: list[float], share: float) -> list[float]:
    """Minus the predicted output error at fractions q/GRID of the full cache, for a site holding
    `share` now: its measured curve below `share`, continued with its tail's slope above."""
    tail_slope = (errors[-1 - TAIL] - errors[-1]) * GRID / TAIL  # error saved per unit of kept fraction
    utility = []
    for q in range(GRID + 1):
        x = q / GRID / share
        utility.append(-curve_at(errors, x) if x <= 1.0 else -errors[-1] + tail_slope * (x - 1.0))
    return utility

def measure(cache, q: torch.Tensor, k_slots: torch.Tensor, scale: float, scores: torch.Tensor) -> list[float]:
    """Output-error curve of the newest query `q` [B, Hq, 1, D] over `cache`'s candidates (every
    cached token but the new one), ranked by `scores` [B, Hkv, T]; averaged over batch and heads."""
    keys, values = cache.keys, cache.values
    group = q.shape[1] // keys.shape[1]
    logits = (q[:, :, -1:].float() @ keys.float().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    padding = (k_slots < 0).repeat_interleave(group, 1)[:, :, None, :]
    probs = torch.softmax(logits.masked_fill(padding, float("-inf")), dim=-1)
    context = keys.shape[-2] - 1
    return output_errors(scores[..., :context], probs, values, context).mean(dim=(0, 1)).tolist()
