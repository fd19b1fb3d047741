"""The data path of `kvpass.optimize` after the sites are found: plan jointly, then rewrite.

`solve` plans every transform in phase order (structure, selection, eviction), so eviction
sizes itself to whatever the others left, and checks the budget can be met before anything
is touched. `apply` runs each transform's handler for the model's backend in the same order;
if any step fails, every earlier step is undone and the model is left as it was.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from kvpass.budget import Budget
from kvpass.errors import UnsupportedModelError
from kvpass.methods import get_method
from kvpass.planning import Plan, build_plan
from kvpass.site import SiteReport
from kvpass.transforms.base import (Backend, Phase, PlanningContext, RewriteTarget, Transform, from_record,
                                    handler_for)
from kvpass.transforms.evict import Evict


def check_transforms(transforms: Any, sites: SiteReport, backend: Backend, what: str) -> list[Transform]:
    """The transforms as a list, each applicable to this model: a handler for its backend and the
    anchors it needs on every site. Clear errors otherwise."""
    if isinstance(transforms, Transform) or not isinstance(transforms, Sequence):
        raise TypeError(f"transforms must be a list of kvpass transforms (e.g. [kvpass.Evict()]), got {transforms!r}")
    transforms = list(transforms)
    for transform in transforms:
        if not isinstance(transform, Transform):
            raise TypeError(f"transforms: {transform!r} is not a kvpass transform (kvpass.Evict, kvpass.PruneHeads, ...)")
    kinds = [type(t) for t in transforms]
    repeated = sorted({kind.__name__ for kind in kinds if kinds.count(kind) > 1})
    if repeated:
        raise ValueError(f"transforms lists {repeated} more than once; give each transform once")
    for transform in transforms:
        handler_for(transform, backend, what)
        for anchor in transform.needs:
            missing = [site.name for site in sites if getattr(site, anchor, None) is None]
            if missing:
                raise UnsupportedModelError(
                    f"{type(transform).__name__} needs the {anchor} of every attention site, but the graph does not "
                    f"show them for {missing} (for projections: weights that are not plain parameters, or a layout "
                    "kvpass does not read); the model is left unchanged")
    return transforms


def solve(model: Any, sites: SiteReport, budget: Budget, transforms: list[Transform], *, dtype_bytes: int,
          seq_len: int | None = None, calibration: Any = None, tokenizer: Any = None,
          previous: Plan | None = None) -> Plan:
    """One plan for all `transforms`, in phase order; raises if they cannot meet `budget`.

    `previous`: the plan of a model whose heads kvpass already removed (re-optimizing it keeps
    them removed and plans eviction on top)."""
    evict = next((t for t in transforms if isinstance(t, Evict)), None)
    context = PlanningContext(
        model=model, sites=sites, budget=budget, dtype_bytes=dtype_bytes,
        eviction_method=evict.method if evict is not None else get_method(None), seq_len=seq_len,
        calibration_source=calibration, tokenizer=tokenizer,
        sinks=evict.sinks if evict is not None else 4, recent=evict.recent if evict is not None else 32,
    )
    records = []
    if previous is not None and previous.pruned_heads:
        if any(t.phase is Phase.STRUCTURE for t in transforms):
            raise UnsupportedModelError("this model's heads were already removed by kvpass: structural transforms "
                                        "apply once; optimize the original model instead")
        context.pruned_heads = dict(previous.pruned_heads)
        context.head_importance = dict(previous.head_importance)
        records = [r for r in previous.transforms if from_record(r).phase is Phase.STRUCTURE]
    for transform in sorted(transforms, key=lambda t: t.phase):
        transform.decide(context)
    plan = context.plan
    if plan is None:  # nothing evicts: the structural transforms must meet the budget alone
        plan = build_plan(list(sites), budget, None, dtype_bytes=dtype_bytes, seq_len=seq_len,
                          pruned_heads=context.pruned_heads)
    plan.head_importance = context.head_importance
    plan.transforms = records + [t.record() for t in transforms]
    return plan


EVICT_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(Evict).parameters.items()
                  if parameter.kind is parameter.KEYWORD_ONLY}
"""`kvpass.Evict`'s keyword options and their defaults (`sinks`, `recent`, `evict_every`, ...)."""


def shorthand_transforms(transforms: Any, plan: Any, method: Any, method_options: dict[str, Any],
                         shorthand: dict[str, Any], defaults: dict[str, Any] | None = None) -> Any:
    """The transforms a verb runs: `transforms` as given, or `[Evict(method, **shorthand,
    **method_options)]` when neither `transforms` nor `plan` is. Eviction keywords given beside
    `transforms=` or `plan=` (any value but the verb's default: Evict's, or `defaults`) would be
    silently ignored: an error names them instead. Returns None when a plan says what to run."""
    if transforms is None and plan is None:
        return [Evict(method, **shorthand, **method_options)]
    defaults = {**EVICT_DEFAULTS, **(defaults or {})}
    given = sorted([key for key, value in shorthand.items() if value != defaults[key]] + list(method_options)
                   + (["method"] if method is not None else []))
    if given:
        raise TypeError(f"{given} are options of kvpass.Evict: with transforms= or plan=, set them on the "
                        "Evict transform (kvpass.Evict(method, ...)) instead")
    if transforms is not None and plan is not None:
        raise TypeError("give transforms= or plan=, not both: a plan already records its transforms")
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"plan must be a kvpass Plan (from kvpass.plan(...) or kvpass.Plan.load(path)), "
                        f"got {type(plan).__name__}")
    return transforms


def plan_transforms(plan: Plan) -> list[Transform]:
    """The transforms a plan was made with (a version-1 plan: eviction with its method)."""
    if plan.transforms:
        return [from_record(record) for record in plan.transforms]
    if plan.method is None:
        return []
    return [Evict(plan.method, sinks=plan.sinks, recent=plan.recent, evict_every=plan.evict_every,
                  allocation=plan.allocation, reallocate=plan.reallocate)]


def apply(target: RewriteTarget, transforms: list[Transform], what: str) -> Any:
    """Run every transform's handler in phase order; undo all of them if one fails. Returns the
    rewritten model (the same object, except for backends that build a new module)."""
    try:
        for transform in sorted(transforms, key=lambda t: t.phase):
            handler_for(transform, target.backend, what)(transform, target)
    except Exception:
        target.rollback()
        raise
    return target.model
