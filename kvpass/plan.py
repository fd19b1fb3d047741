"""Plans: how much of each site's KV cache survives, how that is chosen, and the arithmetic that enforces it.

A `Plan` maps every attention site to a budget fraction (and, for token and byte budgets,
an absolute token cap). The budget is a hard cap on bytes: at every moment, the bytes a
site's cache holds (K, V and any per-token state the method keeps) are at most
`fraction x` the bytes the full cache would hold, and at most the site's token cap. Sinks
and the recent window are carved out of that cap, never added on top.

`budget=0.5` is global: the sites' fractions, weighted by their bytes per token, average
0.5, so the whole cache stays within half. How the half is spread is the allocation:

* "uniform": every site the same fraction;
* "pyramid": linearly less with depth (PyramidKV), between a floor and a ceiling;
* "adaptive": greedy over the calibration's output-error curves (`kvpass.calibration`):
  each quantum of budget goes to the site whose predicted attention-output error falls
  most per byte. On the curves' convex envelopes this minimises the total predicted error.

The schedule arithmetic is written with `kvpass.cost`'s `smin`/`where`, so the same code
gives the ints the runtime evicts by and the sympy formulas `Plan.kv_bytes_expr` shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sympy

from kvpass.budget import Budget, parse_budget
from kvpass.cost import BATCH, SEQ, SiteCost, Symbols, site_cost, smax, smin, where
from kvpass.methods import Method, Stat, get_method
from kvpass.site import AttentionSite

if TYPE_CHECKING:
    from kvpass.calibration import Calibration

SLOT_BYTES = 4
"""Each kept token remembers its logical position (int32) per KV head."""
STAT_BYTES = 4
"""Methods that accumulate attention keep one float32 per token and KV head."""
ALLOCATIONS = ("uniform", "pyramid", "adaptive")
QUANTA = 64
"""The adaptive allocator hands out budget in steps of 1/QUANTA of a site's full cache."""


@dataclass(frozen=True)
class SiteSchedule:
    """The eviction arithmetic of one site: how many tokens may stay after `seen` tokens.

    Every method accepts an int `seen` (the runtime) or a sympy expression (the cost model).

    Example:
        >>> s = SiteSchedule(fraction=0.5, kv_bytes_per_token=256, state_bytes_per_token=8)
        >>> s.cap(1000)   # floor(0.5 * 1000 * 256 / (256 + 8))
        484
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
        if self.fraction < 1.0:  # exact rational arithmetic: the byte bound holds to the byte
            per_token = self.kv_bytes_per_token + self.state_bytes_per_token
            held = Fraction(self.fraction) * seen * self.kv_bytes_per_token // per_token
        if self.max_tokens is not None:
            held = smin(held, self.max_tokens)
        return held

    def target(self, seen):
        """Tokens to keep when evicting at `seen`, so the cap still holds after the next
        `evict_every - 1` appended tokens without another eviction."""
        return smax(0, smin(*(self.cap(seen + j) - j for j in range(self.evict_every))))

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


def check_schedule_options(sinks: Any, recent: Any, evict_every: Any) -> None:
    """Validate the eviction knobs shared by every plan, naming the bad argument."""
    for name, value in (("sinks", sinks), ("recent", recent)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if isinstance(evict_every, bool) or not isinstance(evict_every, int) or evict_every < 1:
        raise ValueError(f"evict_every must be an int >= 1, got {evict_every!r}")


@dataclass
class Plan:
    """A budget per attention site, the method that realises it, and the evidence behind it.

    Example:
        >>> from kvpass.methods import get_method
        >>> site = AttentionSite("layers.0.attn", 0, 4, 2, 16, None, True)
        >>> plan = uniform_plan([site], 0.5, get_method("h2o"))
        >>> plan.budgets, plan.kv_bytes(1000) <= 0.5 * plan.full_kv_bytes(1000)
        ({'layers.0.attn': 0.5}, True)
    """

    method: Method
    budgets: dict[str, float]
    """Site name -> fraction of its full cache's bytes (one fraction per site: the compacted
    cache keeps the same number of tokens in every KV head of a layer)."""
    sinks: int = 4
    recent: int = 32
    evict_every: int = 1
    allocation: str = "uniform"
    max_tokens: dict[str, int] = field(default_factory=dict)
    """Site name -> absolute token cap (token and byte budgets); the site holds at most the
    smaller of this and its fraction's cap."""
    sites: list[AttentionSite] = field(default_factory=list)
    """Geometry of every site, for byte and cost accounting."""
    dtype_bytes: int = 4
    """Element size of the cache the byte figures assume (the model's parameter dtype)."""
    requested: str = ""
    """The budget as written (`0.5`, `'2048 tokens'`, `'1.5GiB'`)."""
    entropy: dict[str, list[float]] = field(default_factory=dict)
    """Site name -> normalised attention entropy per KV head, from calibration."""
    retention: dict[str, float] = field(default_factory=dict)
    """Site name -> predicted share of the last-window attention mass the kept tokens hold."""
    output_error: dict[str, float] = field(default_factory=dict)
    """Site name -> predicted relative error of the attention output at its budget."""
    floor: float = 0.0
    ceiling: float = 1.0
    """Bounds every site's fraction stays within, at plan time and when re-allocating."""
    reallocate: int = 0
    """Re-spread the budget between sites every this many decoded tokens (0: fixed shares);
    see `kvpass.runtime.reallocation`."""

    def require_budgets(self, sites) -> None:
        """Raise unless every site has a budget in this plan."""
        missing = {site.name for site in sites} - set(self.budgets)
        if missing:
            raise ValueError(f"plan has no budget for sites {sorted(missing)}")

    def schedule(self, site: AttentionSite, dtype_bytes: int) -> SiteSchedule:
        """The eviction arithmetic for `site` with a cache stored in `dtype_bytes`-wide elements."""
        fraction, max_tokens = self.budgets[site.name], self.max_tokens.get(site.name)
        prunes = fraction < 1.0 or max_tokens is not None
        state, stat = state_bytes_per_token(site, self.method) if prunes else (0, 0)
        return SiteSchedule(
            fraction=fraction,
            kv_bytes_per_token=site.kv_bytes_per_token(dtype_bytes),
            state_bytes_per_token=state,
            sinks=self.sinks,
            recent=self.recent,
            evict_every=self.evict_every,
            max_tokens=max_tokens,
            stat_bytes_per_token=stat,
            page_size=self.method.page_size,
        )

    def _geometry(self) -> list[AttentionSite]:
        if not self.sites:
            raise ValueError("this plan carries no site geometry: make it with kvpass.plan() or build_plan(sites, ...)")
        return self.sites

    def kv_bytes(self, seq_len: int, batch: int = 1) -> int:
        """Bytes the pruned cache holds after a prefill of `seq_len` tokens per sequence,
        exactly as `kvpass.cache_bytes` counts them (no padding). Never above the budget.

        Example:
            >>> plan.kv_bytes(4096)      # doctest: +SKIP
            47185920
        """
        _check_length(seq_len, batch)
        return int(sum(self.schedule(site, self.dtype_bytes).held_bytes(seq_len, batch) for site in self._geometry()))

    def full_kv_bytes(self, seq_len: int, batch: int = 1) -> int:
        """Bytes the full (unpruned) cache holds after `seq_len` tokens per sequence."""
        _check_length(seq_len, batch)
        return batch * seq_len * sum(site.kv_bytes_per_token(self.dtype_bytes) for site in self._geometry())

    @property
    def kv_bytes_expr(self) -> sympy.Expr:
        """`kv_bytes` as a sympy expression in `kvpass.cost.SEQ` and `BATCH`."""
        return sum((cost.kv_bytes for cost in self.costs().values()), sympy.Integer(0))

    @property
    def full_kv_bytes_expr(self) -> sympy.Expr:
        """`full_kv_bytes` as a sympy expression in `kvpass.cost.SEQ` and `BATCH`."""
        return sympy.expand(BATCH * SEQ * sum(site.kv_bytes_per_token(self.dtype_bytes) for site in self._geometry()))

    def costs(self, symbols: Symbols = Symbols()) -> dict[str, SiteCost]:
        """Site name -> its symbolic costs under this plan (KV bytes, prefill FLOPs, decode bytes)."""
        scored = {Stat.NONE: 0, Stat.LAST_QUERY: 1, Stat.WINDOW: smin(self.method.window, symbols.seq),
                  Stat.COLUMN_SUM: symbols.seq}[self.method.stat]
        return {
            site.name: site_cost(site, self.dtype_bytes, symbols, self.schedule(site, self.dtype_bytes), scored)
            for site in self._geometry()
        }

    def table(self, seq_len: int = 4096) -> str:
        """A markdown table for people: per site its entropy, budget, predicted retained mass and
        output error, and bytes.

        Example:
            >>> print(plan.table(4096))   # doctest: +SKIP
        """
        rows = [f"| layer | site | entropy | budget | retained | output error | KiB @ {seq_len} |",
                "|---|---|---|---|---|---|---|"]
        for site in self._geometry():
            entropy = self.entropy.get(site.name)
            cap = self.max_tokens.get(site.name)
            retained, error = self.retention.get(site.name), self.output_error.get(site.name)
            cells = [
                str(site.layer), site.name,
                f"{sum(entropy) / len(entropy):.3f}" if entropy else "-",
                f"{self.budgets[site.name]:.3f}" + (f" / {cap} tok" if cap is not None else ""),
                f"{retained:.3f}" if retained is not None else "-",
                f"{error:.3f}" if error is not None else "-",
                f"{self.schedule(site, self.dtype_bytes).held_bytes(seq_len) / 1024:.1f}",
            ]
            rows.append("| " + " | ".join(cells) + " |")
        full, pruned = self.full_kv_bytes(seq_len), self.kv_bytes(seq_len)
        rows.append(f"| all | {self.allocation}, {self.method.name}, budget {self.requested or '?'} | | "
                    f"{pruned / full:.3f} | | | {pruned / 1024:.1f} of {full / 1024:.1f} |")
        return "\n".join(rows)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (method, budgets, caps, sites, calibration summary).

        Sites are saved without `extra` (graph-node details only a rewriter of that one
        captured graph can use); `optimize` re-finds the sites and matches budgets by name."""
        data = {
            "method": {"name": self.method.name, "options": asdict(self.method)},
            "sites": [{f.name: getattr(site, f.name) for f in fields(site) if f.name != "extra"} for site in self.sites],
            **{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("method", "sites")},
        }
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan written by `save`.

        Example:
            >>> plan.save("plan.json"); kvpass.optimize(model, plan=Plan.load("plan.json"))  # doctest: +SKIP
        """
        data = json.loads(Path(path).read_text())
        method = data.pop("method")
        sites = [AttentionSite(**site) for site in data.pop("sites")]
        return cls(method=get_method(method["name"], **method["options"]), sites=sites, **data)


def _check_length(seq_len: Any, batch: Any) -> None:
    for name, value in (("seq_len", seq_len), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def build_plan(
    sites: list[AttentionSite],
    budget: float | str | Budget,
    method: Method,
    allocation: str = "uniform",
    calibration: "Calibration | None" = None,
    *,
    dtype_bytes: int = 4,
    seq_len: int | None = None,
    floor: float | None = None,
    ceiling: float = 1.0,
    sinks: int = 4,
    recent: int = 32,
    evict_every: int = 1,
    reallocate: int = 0,
) -> Plan:
    """A plan for `sites` within `budget`, spread by `allocation`.

    Fraction budgets give each site a fraction so that the byte-weighted mean is exactly the
    budget (up to one float ulp, always on the safe side). Token and byte budgets are per
    sequence and absolute: the site shares are allocated at the fraction the budget is of the
    full cache at `seq_len` tokens (the length in use; `kvpass.plan` passes the model's context
    length), then turned into per-site token caps whose bytes sum to at most the budget, each
    site keeping at least its sinks and recent window. A site's schedule caps at the smaller of
    its fraction cap and its token cap, so an absolute budget holds at every length.
    `floor` (default: half the fraction) and `ceiling` bound every site's fraction.
    `reallocate` > 0 moves budget between sites while decoding (fraction budgets only).

    Example:
        >>> sites = [AttentionSite(f"l{i}", i, 4, 2, 16, None, True) for i in range(4)]
        >>> [round(b, 3) for b in build_plan(sites, 0.5, get_method("tova"), "pyramid").budgets.values()]
        [0.778, 0.583, 0.389, 0.25]
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} is not one of {ALLOCATIONS}")
    if allocation == "adaptive" and calibration is None:
        raise ValueError("allocation='adaptive' needs a calibration (kvpass.calibration.calibrate)")
    parsed = parse_budget(budget)
    weights = [site.kv_bytes_per_token(dtype_bytes) for site in sites]
    if parsed.kind == "fraction":
        fraction = parsed.value
    else:
        if seq_len is None or seq_len < 1:
            raise ValueError(f"budget={parsed.text!r} is absolute: a seq_len >= 1 is needed to spread it, got {seq_len!r}")
        fraction = min(1.0, parsed.bytes_per_sequence(sum(weights)) / (seq_len * sum(weights)))
    floor = fraction / 2 if floor is None else floor
    if not 0.0 <= floor <= fraction:
        raise ValueError(f"floor must be in [0, budget fraction {fraction:.4g}], got {floor!r}")
    if not fraction <= ceiling <= 1.0:
        raise ValueError(f"ceiling must be in [budget fraction {fraction:.4g}, 1], got {ceiling!r}")

    if isinstance(reallocate, bool) or not isinstance(reallocate, int) or reallocate < 0:
        raise ValueError(f"reallocate must be an int >= 0 (decoded tokens between re-allocations; 0: off), "
                         f"got {reallocate!r}")
    if reallocate and parsed.kind != "fraction":
        raise ValueError(f"reallocate={reallocate} needs a fraction budget; budget={parsed.text!r} is absolute")

    plan = Plan(method=method, budgets={}, sinks=sinks, recent=recent, evict_every=evict_every,
                allocation=allocation, sites=list(sites), dtype_bytes=dtype_bytes, requested=parsed.text,
                floor=floor, ceiling=ceiling, reallocate=reallocate)
    if calibration is not None:
        missing = [site.name for site in sites if site.name not in calibration.retention]
        if missing:
            raise ValueError(f"calibration has no curves for sites {missing}")
        curves = [calibration.curve(site.name) for site in sites]
        errors = [calibration.error_curve(site.name) for site in sites]
        # tokens kept per unit of budget fraction, once a pruned site's state bytes are paid
        ratios = [w / (w + state_bytes_per_token(site, method)[0]) for site, w in zip(sites, weights)]
    if allocation == "uniform":
        shares = [fraction] * len(sites)
    elif allocation == "pyramid":
        shares = _fit([len(sites) - i for i in range(len(sites))], fraction, floor, ceiling, weights)
    else:
        shares = spread([[-e for e in error] for error in errors], ratios, fraction, floor, ceiling, weights)
    shares = _within(shares, fraction, weights)
    if calibration is not None:
        plan.entropy = {site.name: calibration.entropy[site.name] for site in sites}
        plan.retention = {site.name: curve_at(curve, share * ratio)
                          for site, curve, share, ratio in zip(sites, curves, shares, ratios)}
        plan.output_error = {site.name: curve_at(error, share * ratio)
                             for site, error, share, ratio in zip(sites, errors, shares, ratios)}
    if parsed.kind == "fraction":
        plan.budgets = {site.name: share for site, share in zip(sites, shares)}
    else:
        plan.budgets = {site.name: 1.0 for site in sites}
        plan.max_tokens = _token_caps(plan, parsed, shares, weights)
    return plan


def uniform_plan(sites: list[AttentionSite], budget: float, method: Method, **options: Any) -> Plan:
    """Every site gets the same fraction (what `kvpass.optimize` does by default).

    Example:
        >>> uniform_plan([AttentionSite("a", 0, 4, 2, 16, None, True)], 0.25, get_method("h2o")).budgets
        {'a': 0.25}
    """
    return build_plan(sites, budget, method, "uniform", **options)


def _fit(priorities: list[float], fraction: float, floor: float, ceiling: float, weights: list[int]) -> list[float]:
    """Shares proportional to `priorities`, clipped to [floor, ceiling], byte-weighted mean `fraction`."""
    target = fraction * sum(weights)

    def shares(scale: float) -> list[float]:
        return [min(ceiling, max(floor, scale * p)) for p in priorities]

    low, high = 0.0, ceiling / min(priorities)
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if sum(s * w for s, w in zip(shares(middle), weights)) <= target else (low, middle)
    return shares(low)


def curve_at(curve: list[float], kept: float) -> float:
    """A curve's value at a kept fraction of the tokens (clamped to [0, 1]), interpolated between the curve's evenly spaced points."""
    position = min(max(kept, 0.0), 1.0) * (len(curve) - 1)
    index = min(int(position), len(curve) - 2)
    return curve[index] + (position - index) * (curve[index + 1] - curve[index])


def _concave_envelope(curve: list[float]) -> list[float]:
    """The least concave function above the evenly spaced points of `curve`, at the same points.

    Example:
        >>> _concave_envelope([0.0, 0.1, 0.9, 1.0])
        [0.0, 0.45, 0.9, 1.0]
    """
    hull: list[int] = []  # indices of the upper hull's vertices (monotone chain)
    for i, y in enumerate(curve):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (curve[b] - curve[a]) * (i - a) <= (y - curve[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(i)
    envelope = []
    for a, b in zip(hull, hull[1:]):
        envelope += [curve[a] + (curve[b] - curve[a]) * (i - a) / (b - a) for i in range(a, b)]
    return envelope + [curve[hull[-1]]]


def spread(utilities: list[list[float]], ratios: list[float], fraction: float, floor: float, ceiling: float,
           weights: list[int]) -> list[float]:
    """Site fractions in [floor, ceiling] maximising the summed `utilities` (curves over the kept
    fraction, evenly sampled on [0, 1]; a site keeps `share * ratio` of its tokens), whose
    byte-weighted mean (`weights`: bytes per token) is within `fraction`.

    Example:
        >>> [round(s, 3) for s in spread([[0, 1, 1], [0, 0.2, 0.4]], [1.0, 1.0], 0.5, 0.0, 1.0, [1, 1])]
        [0.5, 0.5]
    """
    return _within(_greedy(utilities, ratios, fraction, floor, ceiling, weights), fraction, weights)


def _greedy(curves: list[list[float]], ratios: list[float], fraction: float, floor: float, ceiling: float,
            weights: list[int]) -> list[float]:
    """Marginal-gain allocation: each quantum of budget to the site whose predicted utility
    (`curves`, increasing in the kept fraction) gains most per byte (ties to the site with the smaller share), until the bytes are spent.

    Gains are read off each curve's upper concave envelope: measured curves have bumps where
    one more token first hurts and then helps, and a greedy step on the raw curve would stop
    in front of such a bump. On concave curves, greedy is optimal."""
    curves = [_concave_envelope(curve) for curve in curves]
    shares = [floor] * len(curves)
    spare = fraction * sum(weights) - floor * sum(weights)
    step = 1.0 / QUANTA
    while spare > 1e-12 * sum(weights):
        best, best_key = None, None
        for i, (curve, ratio, share, weight) in enumerate(zip(curves, ratios, shares, weights)):
            size = min(step, ceiling - share, spare / weight)
            if size <= 0:
                continue
            gain = (curve_at(curve, (share + size) * ratio) - curve_at(curve, share * ratio)) / (size * weight)
            key = (gain, -share)
            if best_key is None or key > best_key:
                best, best_key = i, key
        if best is None:
            break
        size = min(step, ceiling - shares[best], spare / weights[best])
        shares[best] += size
        spare -= size * weights[best]
    return shares


def _within(shares: list[float], fraction: float, weights: list[int]) -> list[float]:
    """Shave float rounding off the largest share until the byte-weighted sum is exactly within budget."""
    shares = list(shares)
    limit = Fraction(fraction) * sum(weights)
    while (excess := sum(Fraction(s) * w for s, w in zip(shares, weights)) - limit) > 0:
        i = max(range(len(shares)), key=shares.__getitem__)
        shares[i] = math.nextafter(shares[i] - float(excess) / weights[i], 0.0)
    return shares


def _token_caps(plan: Plan, budget: Budget, shares: list[float], weights: list[int]) -> dict[str, int]:
    """Per-site token caps for an absolute budget: sinks + window everywhere, the rest split by share."""
    total = budget.bytes_per_sequence(sum(weights))
    per_token = [w + state_bytes_per_token(site, plan.method)[0] for site, w in zip(plan.sites, weights)]
    base = plan.sinks + plan.recent
    floor_bytes = base * sum(per_token)
    if total < floor_bytes:
        raise ValueError(
            f"budget={budget.text!r} ({total} bytes) is smaller than the sink/window floor: keeping sinks={plan.sinks} "
            f"+ recent={plan.recent} tokens at {len(plan.sites)} sites takes {floor_bytes} bytes"
        )
    spare = total - floor_bytes  # split exactly: the caps' bytes never sum above the budget
    spread = sum(Fraction(s) * w for s, w in zip(shares, weights))
    return {
        site.name: base + int(spare * Fraction(share) * w / spread // cost)
        for site, share, w, cost in zip(plan.sites, shares, weights, per_token)
    }
