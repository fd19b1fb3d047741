"""Spreading a global budget over the attention sites: the allocators and `build_plan`.

`budget=0.5` is global: the sites' fractions, weighted by their bytes per token, average 0.5
of the *unmodified* model's cache, so the whole cache stays within half. Structural transforms
(head pruning) shrink some sites first; eviction then supplies whatever saving is left. How
the eviction budget is spread is the allocation:

* "uniform": every site the same fraction (with streaming heads, when the budget covers the
  others whole: every non-streaming head the same, `streaming_shares`);
* "pyramid": linearly less with depth (PyramidKV), between a floor and a ceiling;
* "adaptive": greedy over the calibration's output-error curves (`kvpass.calibration`):
  each quantum of budget goes to the site whose predicted attention-output error falls
  most per byte. On the curves' convex envelopes this minimises the total predicted error.

Selection transforms (token filtering) leave a share of a site's tokens out before eviction
sees them: that share is the site's `ceiling` (eviction caps it there, enforcing at every step
what filtering only targets), and the budget the site does not need goes to the others.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from kvpass.budget import Budget, parse_budget
from kvpass.methods import Method
from kvpass.planning.head_schedule import SHARE_UNIT
from kvpass.planning.record import ALLOCATIONS, Plan
from kvpass.planning.schedule import check_schedule_options, state_bytes_per_token
from kvpass.site import AttentionSite

if TYPE_CHECKING:
    from kvpass.calibration import Calibration

QUANTA = 64
"""The adaptive allocator hands out budget in steps of 1/QUANTA of a site's full cache."""


def build_plan(
    sites: list[AttentionSite],
    budget: float | str | Budget,
    method: Method | None,
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
    pruned_heads: dict[str, list[int]] | None = None,
    ceilings: dict[str, float] | None = None,
    reserved_bytes: dict[str, int] | None = None,
    streaming_heads: dict[str, list[int]] | None = None,
) -> Plan:
    """A plan for `sites` within `budget`, evicting with `method` (None: no eviction), spread by `allocation`.

    `pruned_heads` (site -> removed KV heads, decided by head pruning) shrink sites before
    eviction; the budget stays relative to the unmodified model, so eviction only supplies the
    saving that is left (none, when the removed heads already meet the budget).

    Fraction budgets give each site a fraction so that the byte-weighted mean is exactly the
    budget (up to one float ulp, always on the safe side). Token and byte budgets are per
    sequence and absolute: the site shares are allocated at the fraction the budget is of the
    cache at `seq_len` tokens (the length in use; `kvpass.plan` passes the model's context
    length), then turned into per-site token caps whose bytes sum to at most the budget, each
    site keeping at least its sinks and recent window. A site's schedule caps at the smaller of
    its fraction cap and its token cap, so an absolute budget holds at every length.
    `floor` (default: half the fraction) and `ceiling` bound every site's fraction.
    `reallocate` > 0 moves budget between sites while decoding (fraction budgets only).

    With `streaming_heads` (site -> KV heads that keep only a fixed window of tokens), "uniform"
    is uniform over the heads that keep budgeted tokens: see `streaming_shares` (fraction budgets,
    when no floor, ceiling or selection transform bounds the sites).

    Below budget 1, `ceilings` (site -> the share of tokens a selection transform keeps there)
    bound those sites further, and `reserved_bytes` (site -> bytes per sequence a transform
    holds beside the cache) are carved out of their caps, which therefore always evict.

    Raises ValueError when the budget cannot be met: no eviction and the removed heads keep more
    than the budget, or an absolute budget with no eviction.

    Example:
        >>> from kvpass.methods import get_method
        >>> sites = [AttentionSite(f"l{i}", i, 4, 2, 16, None, True) for i in range(4)]
        >>> [round(b, 3) for b in build_plan(sites, 0.5, get_method("tova"), "pyramid").budgets.values()]
        [0.778, 0.583, 0.389, 0.25]
        >>> build_plan(sites, 0.5, None, pruned_heads={s.name: [1] for s in sites}).budgets["l0"]
        1.0
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} is not one of {ALLOCATIONS}")
    if allocation == "adaptive" and calibration is None:
        raise ValueError("allocation='adaptive' needs a calibration (kvpass.calibration.calibrate)")
    if isinstance(reallocate, bool) or not isinstance(reallocate, int) or reallocate < 0:
        raise ValueError(f"reallocate must be an int >= 0 (decoded tokens between re-allocations; 0: off), "
                         f"got {reallocate!r}")
    check_schedule_options(sinks, recent, evict_every)
    parsed = parse_budget(budget)
    if reallocate and parsed.kind != "fraction":
        raise ValueError(f"reallocate={reallocate} needs a fraction budget; budget={parsed.text!r} is absolute")
    if reallocate and any(site.window is not None for site in sites):
        raise ValueError(f"reallocate={reallocate}: moving budget between sites while decoding is not supported with "
                         "sliding-window or chunked layers yet (their share of the cap is fixed by their window)")

    plan = Plan(method=method, budgets={site.name: 1.0 for site in sites}, sinks=sinks, recent=recent,
                evict_every=evict_every, allocation=allocation, sites=list(sites), dtype_bytes=dtype_bytes,
                requested=parsed.text, ceiling=ceiling, reallocate=reallocate, pruned_heads=dict(pruned_heads or {}),
                reserved_bytes=dict(reserved_bytes or {}))
    plan.validate("pruned_heads")
    pruned = [plan.geometry(site) for site in sites]
    weights = [site.kv_bytes_per_token(dtype_bytes) for site in pruned]
    reference = sum(site.kv_bytes_per_token(dtype_bytes) for site in sites)
    if parsed.kind == "fraction":
        fraction = _float_below(Fraction(parsed.value) * reference / sum(weights))
    else:
        if seq_len is None or seq_len < 1:
            raise ValueError(f"budget={parsed.text!r} is absolute: a seq_len >= 1 is needed to spread it, got {seq_len!r}")
        spendable = parsed.bytes_per_sequence(reference) - sum(plan.reserved_bytes.values())
        fraction = min(1.0, max(spendable, 0) / (seq_len * sum(weights)))
    capped = parsed.kind != "fraction" or parsed.value < 1.0
    if method is None:
        return _without_eviction(plan, parsed)
    if reallocate and plan.reserved_bytes:
        raise ValueError(f"reallocate={reallocate} does not work with token filtering yet (a re-allocated site could "
                         "stop evicting and no longer make room for its anchors); use reallocate=0")
    selected = _site_ceilings(sites, ceilings if capped else None, plan.reserved_bytes if capped else None)
    if fraction >= 1.0 and parsed.kind == "fraction" and min(selected) >= 1.0:
        return plan  # the structural transforms alone meet the budget: nothing is evicted
    fraction = min(fraction, 1.0)
    limits = [min(ceiling, limit) for limit in selected]

    floor_given = floor
    floor = fraction / 2 if floor is None else floor
    if not 0.0 <= floor <= fraction:
        raise ValueError(f"floor must be in [0, budget fraction {fraction:.4g}], got {floor!r}")
    if not fraction <= ceiling <= 1.0:
        raise ValueError(f"ceiling must be in [budget fraction {fraction:.4g}, 1], got {ceiling!r}")
    plan.floor = floor
    if calibration is not None:
        missing = [site.name for site in sites if site.name not in calibration.retention]
        if missing:
            raise ValueError(f"calibration has no curves for sites {missing}")
        kept = {site.name: _kept_heads(plan, site) for site in sites}
        curves = [calibration.curve(site.name, kept[site.name]) for site in sites]
        errors = [calibration.error_curve(site.name, kept[site.name]) for site in sites]
        # tokens kept per unit of budget fraction, once a pruned site's state bytes are paid
        ratios = [w / (w + state_bytes_per_token(site, method)[0]) for site, w in zip(pruned, weights)]
    # Windowed sites (sliding-window / chunked layers) keep the global fraction: with them at
    # exactly the fraction, the full-attention sites' shares may vary and the cap still holds at
    # every length (a windowed site's bytes stop growing; see kvpass.planning.schedule.WindowShare).
    # Token filtering never selects in a windowed site, so their limits never bind here.
    spread_over = [i for i, site in enumerate(sites) if site.window is None]
    shares = [fraction] * len(sites)
    by_heads = None
    if (streaming_heads and allocation == "uniform" and parsed.kind == "fraction" and floor_given is None
            and ceiling == 1.0 and min(limits) >= 1.0 and len(spread_over) == len(sites)):
        streaming = [len(streaming_heads.get(site.name, ())) for site in sites]
        by_heads = streaming_shares([site.num_kv_heads for site in pruned], streaming, weights, fraction)
    if by_heads is not None:
        shares = by_heads
    elif spread_over and (allocation != "uniform" or min(limits) < fraction):
        pick = lambda values: [values[i] for i in spread_over]  # noqa: E731
        if allocation == "uniform":
            part = _fit([1] * len(spread_over), fraction, floor, pick(limits), pick(weights))
        elif allocation == "pyramid":
            part = _fit([len(sites) - i for i in spread_over], fraction, floor, pick(limits), pick(weights))
        else:
            part = spread(pick([[-e for e in error] for error in errors]), pick(ratios), fraction, floor,
                          pick(limits), pick(weights))
        for i, share in zip(spread_over, part):
            shares[i] = share
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
        plan.max_tokens = _token_caps(plan, parsed, shares, weights, pruned, reference)
    return plan


def streaming_shares(kv_heads: list[int], streaming: list[int], weights: list[int],
                     fraction: float) -> list[float] | None:
    """Site fractions that give the budget to the heads that keep budgeted tokens, or None.

    A streaming head holds a fixed window whatever the length; every other head wants all tokens.
    Each streaming head gets the same share σ of a full head's bytes and every other head a whole
    head's (site s with h heads, r budgeted: (r + (h - r) σ) / h), σ chosen so that the byte-weighted
    sum is the budget `fraction` (the sites' bytes per token `weights` split evenly over their
    heads). Once the length T reaches window / σ, every head keeps all it wants; shorter, the
    streaming heads' windows shrink to fit; the cap holds at every length, since the shares sum to
    the budget. None when the budgeted heads alone need the whole budget (then they must evict, and
    the plain uniform split applies).

    Example:
        >>> [round(x, 3) for x in streaming_shares([2, 2], [2, 0], [8, 8], 0.55)]
        [0.1, 1.0]
    """
    per_head = [w / h if h else 0 for w, h in zip(weights, kv_heads)]
    budget = fraction * sum(weights)
    budgeted = sum(b * (h - s) for b, h, s in zip(per_head, kv_heads, streaming))
    streamed = sum(b * s for b, s in zip(per_head, streaming))
    if budget <= budgeted or streamed == 0:
        return None
    share = min(1.0, (budget - budgeted) / streamed)
    return [(h - s + s * share) / h if h else 1.0 for h, s in zip(kv_heads, streaming)]


def calibrated_head_shares(plan: Plan, calibration: "Calibration", head_floor: float,
                           seq_len: int | None = None) -> dict[str, list[int]]:
    """Site name -> each budgeted KV head's fixed part of an equal share, in 1/SHARE_UNIT units
    (`Plan.head_shares`): the site's kept fraction spread over its heads as `spread` spreads the
    global one over sites, by the calibration's per-head output-error curves, each head keeping at
    least `head_floor` of an equal share. Heads that lose little when cut give rows to those that
    lose much. Sites that evict nothing, or have one budgeted head, are left out.
    `seq_len`: the length an absolute budget's token caps are read at (else the fractions).

    Example (head 0 loses nothing when cut, head 1 loses in proportion):
        >>> from kvpass.calibration import Calibration
        >>> from kvpass.methods import get_method
        >>> flat, steep = [0.0] * 65, [1 - i / 64 for i in range(65)]
        >>> calibration = Calibration("tova", [100], {"a": [0.5, 0.5]}, {"a": [flat, flat]}, {"a": [flat, steep]}, 0.0)
        >>> plan = build_plan([AttentionSite("a", 0, 4, 2, 16, None, True)], 0.5, get_method("tova"))
        >>> calibrated_head_shares(plan, calibration, head_floor=0.2)
        {'a': [12, 115]}
    """
    shares = {}
    for site in plan.sites:
        fraction = plan.budgets[site.name]
        if site.name in plan.max_tokens and seq_len:
            fraction = min(fraction, plan.max_tokens[site.name] / seq_len)
        removed = set(plan.pruned_heads.get(site.name, ())) | set(plan.streaming_heads.get(site.name, ()))
        budgeted = [head for head in range(site.num_kv_heads) if head not in removed]
        if fraction >= 1.0 or len(budgeted) < 2:
            continue
        if site.name not in calibration.output_error:
            raise ValueError(f"calibration has no per-head curves for site {site.name!r}")
        errors = [calibration.output_error[site.name][head] for head in budgeted]
        kept = spread([[-e for e in error] for error in errors], [1.0] * len(budgeted), fraction,
                      head_floor * fraction, 1.0, [1] * len(budgeted))
        parts = [int(k / fraction * SHARE_UNIT) for k in kept]
        while sum(parts) > SHARE_UNIT * len(budgeted):  # float rounding up at a whole part
            parts[parts.index(max(parts))] -= 1
        shares[site.name] = parts
    return shares


def _float_below(value: Fraction) -> float:
    """`value` (capped at 1) as the nearest float that is not above it: the byte cap stays exact."""
    result = float(min(value, Fraction(1)))
    return math.nextafter(result, 0.0) if Fraction(result) > value else result


def _kept_heads(plan: Plan, site: AttentionSite) -> list[int] | None:
    """The KV heads head pruning keeps at `site` (None: all of them)."""
    removed = set(plan.pruned_heads.get(site.name, ()))
    return [head for head in range(site.num_kv_heads) if head not in removed] if removed else None


def _site_ceilings(sites: list[AttentionSite], ceilings: dict[str, float] | None,
                   reserved: dict[str, int] | None) -> list[float]:
    """Each site's largest fraction as selection leaves it: the share a selection transform keeps
    there, and just below 1 where bytes are reserved (a cap that never evicts makes no room for them)."""
    limits = []
    for site in sites:
        limit = (ceilings or {}).get(site.name, 1.0)
        if (reserved or {}).get(site.name):
            limit = min(limit, math.nextafter(1.0, 0.0))
        limits.append(limit)
    return limits


def _without_eviction(plan: Plan, budget: Budget) -> Plan:
    """A plan that evicts nothing must meet the budget by its structural transforms alone."""
    if budget.kind != "fraction":
        raise ValueError(f"budget={budget.text!r} is an absolute cap, which only eviction can hold at every length: "
                         "add kvpass.Evict() to the transforms")
    if not plan.within(budget.value):
        kept = sum(plan.geometry(s).kv_bytes_per_token(1) for s in plan.sites) / sum(
            s.kv_bytes_per_token(1) for s in plan.sites)
        raise ValueError(f"budget={budget.text}: the transforms keep {kept:.3f} of the KV-cache bytes and none of "
                         "them evicts; add kvpass.Evict() to the transforms or raise the budget")
    return plan


def uniform_plan(sites: list[AttentionSite], budget: float, method: Method, **options: Any) -> Plan:
    """Every site gets the same fraction (what `kvpass.optimize` does by default).

    Example:
        >>> from kvpass.methods import get_method
        >>> uniform_plan([AttentionSite("a", 0, 4, 2, 16, None, True)], 0.25, get_method("h2o")).budgets
        {'a': 0.25}
    """
    return build_plan(sites, budget, method, "uniform", **options)


def _fit(priorities: list[float], fraction: float, floor: float, ceilings: list[float],
         weights: list[int]) -> list[float]:
    """Shares proportional to `priorities`, clipped to [floor, each site's ceiling], byte-weighted mean
    `fraction` (or every site at its ceiling, when they all fit within it)."""
    target = fraction * sum(weights)

    def shares(scale: float) -> list[float]:
        return [min(ceiling, max(floor, scale * p)) for p, ceiling in zip(priorities, ceilings)]

    low, high = 0.0, max(ceilings) / min(priorities)
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


def spread(utilities: list[list[float]], ratios: list[float], fraction: float, floor: float,
           ceiling: float | list[float], weights: list[int]) -> list[float]:
    """Site fractions in [floor, ceiling] (one ceiling, or one per site) maximising the summed `utilities`
    (curves over the kept fraction, evenly sampled on [0, 1]; a site keeps `share * ratio` of its tokens),
    whose byte-weighted mean (`weights`: bytes per token) is within `fraction`.

    Example:
        >>> [round(s, 3) for s in spread([[0, 1, 1], [0, 0.2, 0.4]], [1.0, 1.0], 0.5, 0.0, 1.0, [1, 1])]
        [0.5, 0.5]
    """
    ceilings = ceiling if isinstance(ceiling, list) else [ceiling] * len(utilities)
    return _within(_greedy(utilities, ratios, fraction, floor, ceilings, weights), fraction, weights)


def _greedy(curves: list[list[float]], ratios: list[float], fraction: float, floor: float, ceilings: list[float],
            weights: list[int]) -> list[float]:
    """Marginal-gain allocation: each quantum of budget to the site whose predicted utility
    (`curves`, increasing in the kept fraction) gains most per byte (ties to the site with the smaller share), until the bytes are spent.

    Gains are read off each curve's upper concave envelope: measured curves have bumps where
    one more token first hurts and then helps, and a greedy step on the raw curve would stop
    in front of such a bump. On concave curves, greedy is optimal."""
    curves = [_concave_envelope(curve) for curve in curves]
    shares = [min(floor, ceiling) for ceiling in ceilings]
    spare = fraction * sum(weights) - sum(s * w for s, w in zip(shares, weights))
    step = 1.0 / QUANTA
    while spare > 1e-12 * sum(weights):
        best, best_key = None, None
        for i, (curve, ratio, share, weight, ceiling) in enumerate(zip(curves, ratios, shares, weights, ceilings)):
            size = min(step, ceiling - share, spare / weight)
            if size <= 0:
                continue
            gain = (curve_at(curve, (share + size) * ratio) - curve_at(curve, share * ratio)) / (size * weight)
            key = (gain, -share)
            if best_key is None or key > best_key:
                best, best_key = i, key
        if best is None:
            break
        size = min(step, ceilings[best] - shares[best], spare / weights[best])
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


def _token_caps(plan: Plan, budget: Budget, shares: list[float], weights: list[int], pruned: list[AttentionSite],
                reference: int) -> dict[str, int]:
    """Per-site token caps for an absolute budget: sinks + window everywhere, the rest split by share.
    `weights` are the pruned sites' bytes per token, `reference` the unmodified model's (all sites)."""
    total = budget.bytes_per_sequence(reference) - sum(plan.reserved_bytes.values())
    per_token = [w + state_bytes_per_token(site, plan.method)[0] for site, w in zip(pruned, weights)]
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
