"""`kvpass.Evict`: budgeted eviction of cached tokens (H2O, SnapKV, StreamingLLM, TOVA, knorm, paged, ...).

Eviction is planned last: the budget is the cap on KV bytes relative to the unmodified model,
and eviction supplies whatever saving the structural transforms left (none when they already
meet it). Its handlers route each site onto the compacted cache: the transformers attention
seam for HF models, an FX rewrite for explicit-cache models, standard-op subgraphs for ONNX.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvpass.errors import UnsupportedModelError
from kvpass.methods import Method, get_method
from kvpass.planning import ALLOCATIONS, build_plan, calibrated_head_shares, check_schedule_options
from kvpass.transforms.base import Backend, Phase, PlanningContext, RewriteTarget, Transform, register
from kvpass.validation import boolean, integer, real

HEAD_FLOORS = {"joint": 0.2, "calibrated": 0.75}
"""How `Evict(per_head=True)` splits a site's budget between its KV heads (one joint top-k at every
eviction, AdaKV; or fixed shares chosen at compile time from calibration), and the `head_floor` each
defaults to. 0.75 for calibrated shares was chosen on the quality suite's dev split (12 samples per
task, budgets 0.25 and 0.125, against 0.2 and 0.5; `benchmarks/results/per_head_dev_calibrated.txt`):
a lower floor starved heads at 0.125; the study calibrated on the two short default prompts, before
the generated retrieval prompts became the default."""
HEAD_ALLOCATIONS = tuple(HEAD_FLOORS)


@dataclass(frozen=True, init=False)
class Evict(Transform):
    """Evict cached tokens with `method` (None: `kvpass.methods.DEFAULT_METHOD`) so that the
    cache stays within the budget at prefill and at every decode step.

    `sinks` first tokens and the `recent` latest ones are always kept, inside the cap.
    Eviction runs at most every `evict_every` steps (evicting a little deeper so the cap still
    holds in between). `allocation` spreads the budget over the sites ('uniform', 'pyramid',
    or 'adaptive' from calibration, each within `floor`..`ceiling`); `reallocate=N` re-spreads
    it every N decoded tokens. Other keywords are the method's options (`span=2`, `window=16`).

    `per_head=True` gives each KV head its own number of tokens (AdaKV): a site's budget goes to
    the best-scored tokens of any of its heads in one joint top-k (GQA query groups' attention
    averaged first; methods with a `shared_keep_set` rank per head here), each head first keeping
    its carve-outs and `head_floor` (default 0.2) of an equal share. `head_allocation="calibrated"`
    fixes each head's share at compile time instead, from calibration's per-head output-error curves
    (heads that lose little when cut give rows to those that lose much; still at least `head_floor`,
    default 0.75, of an equal share each). The shares are measured on long prompts that need
    retrieval: `calibration=` prompts like the ones served, or else four of kvpass's generated ones
    (`kvpass.streaming_calibration.retrieval_prompts`, 1500 tokens; kvpass's two short default
    prompts gain much less: `benchmarks/results/per_head_dev_calibrated.txt`). The cache is ragged:
    heads are stored packed, each costing the rows it holds (`kvpass.runtime.ragged_cache`).

    Example:
        >>> import kvpass
        >>> kvpass.Evict("snapkv", window=16).method.window
        16
        >>> kvpass.Evict("tova", per_head=True).per_head
        True
        >>> kvpass.Evict(per_head=True, head_allocation="calibrated").head_allocation
        'calibrated'
        >>> model = kvpass.optimize(model, budget=0.5, transforms=[kvpass.Evict("tova", span=2)])  # doctest: +SKIP
    """

    name = "Evict"
    phase = Phase.EVICTION
    method: Method
    sinks: int
    recent: int
    evict_every: int
    allocation: str
    floor: float | None
    ceiling: float
    reallocate: int
    per_head: bool
    head_floor: float
    head_allocation: str

    def __init__(self, method: str | Method | None = None, *, sinks: int = 4, recent: int = 32, evict_every: int = 1,
                 allocation: str = "uniform", floor: float | None = None, ceiling: float = 1.0, reallocate: int = 0,
                 per_head: bool = False, head_floor: float | None = None, head_allocation: str = "joint",
                 **method_options: Any) -> None:
        sinks, recent, evict_every = check_schedule_options(sinks, recent, evict_every)
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={allocation!r} is not one of {ALLOCATIONS}")
        if floor is not None:
            floor = real(floor, "Evict: floor", 0.0, 1.0, meaning="least fraction of its cache a site keeps")
        ceiling = real(ceiling, "Evict: ceiling", 0.0, 1.0, low_open=True,
                       meaning="most fraction of its cache a site keeps")
        reallocate = integer(reallocate, "Evict: reallocate", minimum=0,
                             meaning="decoded tokens between re-allocations; 0: off")
        per_head = boolean(per_head, "Evict: per_head")
        if head_allocation not in HEAD_ALLOCATIONS:
            raise ValueError(f"Evict: head_allocation={head_allocation!r} is not one of {HEAD_ALLOCATIONS}")
        head_floor = HEAD_FLOORS[head_allocation] if head_floor is None else real(
            head_floor, "Evict: head_floor", 0.0, 1.0, meaning="least fraction of an equal share a KV head keeps")
        if head_allocation != "joint" and not per_head:
            raise ValueError(f"Evict: head_allocation={head_allocation!r} splits a site's budget between its KV "
                             "heads, which needs per_head=True")
        if per_head and reallocate:
            raise ValueError("per_head=True cannot be combined with reallocate: re-allocation moves budget between "
                             "sites of uniform caches")
        values = {"method": get_method(method, **method_options), "sinks": sinks, "recent": recent,
                  "evict_every": evict_every, "allocation": allocation, "floor": floor, "ceiling": ceiling,
                  "reallocate": reallocate, "per_head": per_head, "head_floor": float(head_floor),
                  "head_allocation": head_allocation}
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def options(self) -> dict[str, Any]:
        options = super().options()
        options["method"] = {"name": self.method.name, "options": asdict(self.method)}
        return options

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "Evict":
        options = dict(options)
        method = options.pop("method")
        return cls(get_method(method["name"], **method["options"]), **options)

    def decide(self, context: PlanningContext) -> None:
        calibration = None
        calibrated_heads = self.per_head and self.head_allocation == "calibrated"
        if self.allocation == "adaptive" or context.calibration_source is not None:
            calibration = context.calibration()
            if calibration.method != self.method.name:
                raise ValueError(f"calibration was measured for method {calibration.method!r}, not {self.method.name!r}")
        context.plan = build_plan(
            list(context.sites), context.budget, self.method, self.allocation, calibration,
            dtype_bytes=context.dtype_bytes, seq_len=context.seq_len, floor=self.floor, ceiling=self.ceiling,
            sinks=self.sinks, recent=self.recent, evict_every=self.evict_every, reallocate=self.reallocate,
            pruned_heads=context.pruned_heads, ceilings=context.kept_fraction, reserved_bytes=context.reserved_bytes,
            streaming_heads=context.streaming_heads,
        )
        context.plan.per_head_budgets, context.plan.head_floor = self.per_head, self.head_floor
        if calibrated_heads:
            context.plan.streaming_heads = context.streaming_heads
            context.plan.head_shares = calibrated_head_shares(
                context.plan, context.calibration(prompts="retrieval"), self.head_floor, context.seq_len)

    def stats(self, plan, cache) -> dict[str, Any]:
        layers = [layer.site_cache for layer in getattr(cache, "layers", []) if hasattr(layer, "site_cache")]
        return {"method": self.method.name, "evictions": sum(layer.evictions for layer in layers)}


@register(Evict, Backend.HF)
def _evict_hf(transform: Evict, target: RewriteTarget) -> None:
    from kvpass.runtime.hf_eviction import bind_plan

    target.undo.append(bind_plan(target.model, target.sites, target.plan))


@register(Evict, Backend.EXPLICIT_CACHE)
def _evict_explicit_cache(transform: Evict, target: RewriteTarget) -> None:
    from kvpass.runtime.explicit_cache import rewrite_explicit_cache

    refuse_ragged(target.plan, "a model that carries its own cache tensors ([B, Hkv, T, D] per layer)")
    target.model = rewrite_explicit_cache(target.model, target.sites, target.plan, target.example_args)


@register(Evict, Backend.ONNX)
def _evict_onnx(transform: Evict, target: RewriteTarget) -> None:
    from kvpass.rewrites.onnx import rewrite_sites

    rewrite_sites(target.model, target.sites, target.plan, target.plan.dtype_bytes)


def refuse_ragged(plan, where: str) -> None:
    """Raise, naming what is asked, when `plan` gives a site's KV heads different numbers of tokens and
    `where` can only hold uniform per-head caches."""
    ragged = [site.name for site in plan.sites if plan.head_schedule(site, plan.dtype_bytes) is not None]
    if ragged:
        asked = "per-head budgets (Evict(per_head=True))" if plan.per_head_budgets else "streaming heads"
        raise UnsupportedModelError(
            f"{asked} need a ragged cache (KV heads of different lengths, packed), which {where} cannot hold "
            f"(sites {ragged[:3]}{'...' if len(ragged) > 3 else ''}): run the Hugging Face model, whose cache "
            "object kvpass replaces")
