"""`kvpass.PruneHeads`: remove whole KV heads (with their query groups) from weights and cache.

Which heads go is decided globally, across layers, before anything is touched: every KV head
gets an importance score from calibration, the lowest-ranked `floor(fraction x all KV heads)`
are removed, and every layer keeps at least one (or `1 - max_per_layer` of its heads).
Scores are comparable across layers because the default one is relative: ||Δo|| / ||o||, the
error that removing the head causes in its attention block's output.

Removal is physical and checked: the handler runs the model once with the removed heads' O
columns zeroed (the exact oracle), removes them, runs it again, and undoes everything unless
both agree. It needs the Q/K/V/O projection anchors (fused QKV weights are sliced).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from kvpass.errors import UnsupportedModelError
from kvpass.runtime.head_surgery import exactness_check, remove_kv_heads, zero_output_columns
from kvpass.transforms.base import Backend, Phase, PlanningContext, RewriteTarget, Transform, register
from kvpass.validation import integer, real

IMPORTANCE = ("output_error", "entropy", "retrieval", "random")


@dataclass(frozen=True)
class PruneHeads(Transform):
    """Remove `fraction` of all KV heads (floor), the least important first, with their query groups.

    `importance`: 'output_error' (calibration: the relative change of the model's output when
    the head is removed, `kvpass.calibration.head_removal_errors`), 'entropy' (the most diffuse heads go first), 'retrieval' (the
    heads that attend least past their recent window go first), or 'random' (seeded by `seed`;
    a control). `max_per_layer` caps the share of one layer's KV heads removed (default: all
    but one). `fraction=0` changes nothing.

    Example:
        >>> import kvpass
        >>> kvpass.PruneHeads(0.25, importance="random").fraction
        0.25
        >>> model = kvpass.optimize(model, budget=0.5, transforms=[kvpass.PruneHeads(0.25), kvpass.Evict()])  # doctest: +SKIP
    """

    name = "PruneHeads"
    phase = Phase.STRUCTURE
    needs = ("projections",)
    fraction: float
    importance: str = "output_error"
    max_per_layer: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        normalized = {
            "fraction": real(self.fraction, "PruneHeads: fraction", 0.0, 1.0, high_open=True,
                             meaning="the share of all KV heads removed"),
            "max_per_layer": None if self.max_per_layer is None else real(
                self.max_per_layer, "PruneHeads: max_per_layer", 0.0, 1.0, low_open=True, high_open=True,
                meaning="None, or the largest share of one layer's KV heads removed"),
            "seed": integer(self.seed, "PruneHeads: seed"),
        }
        if self.importance not in IMPORTANCE:
            raise ValueError(f"PruneHeads: importance must be one of {IMPORTANCE}, got {self.importance!r}")
        for key, value in normalized.items():  # numpy numbers become plain ones (plans are JSON)
            object.__setattr__(self, key, value)

    def decide(self, context: PlanningContext) -> None:
        sites = list(context.sites)
        total = sum(site.num_kv_heads for site in sites)
        remove = math.floor(self.fraction * total)
        limits = {site.name: self._limit(site.num_kv_heads) for site in sites}
        if remove > sum(limits.values()):
            raise ValueError(
                f"PruneHeads: fraction={self.fraction} removes {remove} of {total} KV heads, but at most "
                f"{sum(limits.values())} can go while every layer keeps "
                + ("one" if self.max_per_layer is None else f"{1 - self.max_per_layer:.0%} of its heads"))
        if remove == 0:
            return
        scores = self._scores(context)
        ranked = sorted((score, site.layer, head, site.name) for site in sites
                        for head, score in enumerate(scores[site.name]))
        removed: dict[str, list[int]] = {}
        for _, _, head, name in ranked:
            if sum(map(len, removed.values())) == remove:
                break
            if len(removed.get(name, [])) < limits[name]:
                removed.setdefault(name, []).append(head)
        context.pruned_heads.update({name: sorted(heads) for name, heads in removed.items()})
        context.head_importance.update(scores)

    def _limit(self, kv_heads: int) -> int:
        """Most KV heads one site may lose."""
        if self.max_per_layer is None:
            return kv_heads - 1
        return min(kv_heads - 1, math.floor(self.max_per_layer * kv_heads))

    def _scores(self, context: PlanningContext) -> dict[str, list[float]]:
        """Site name -> importance of each original KV head (higher: kept first)."""
        if self.importance == "random":
            generator = random.Random(self.seed)
            return {site.name: [generator.random() for _ in range(site.num_kv_heads)] for site in context.sites}
        calibration = context.calibration(heads=self.importance == "output_error")
        table = {"output_error": (calibration.head_error, 1.0), "entropy": (calibration.entropy, -1.0),
                 "retrieval": (calibration.long_range, 1.0)}[self.importance]
        measured, sign = table
        missing = [site.name for site in context.sites if site.name not in measured]
        if missing:
            raise UnsupportedModelError(f"PruneHeads: calibration measured no {self.importance} for sites {missing}")
        return {site.name: [sign * value for value in measured[site.name]] for site in context.sites}

    def stats(self, plan, cache) -> dict[str, Any]:
        removed = sum(map(len, plan.pruned_heads.values()))
        total = sum(site.num_kv_heads for site in plan.sites)
        return {"kv_heads_removed": removed, "kv_heads": total, "removed": dict(plan.pruned_heads)}


@register(PruneHeads, Backend.HF, Backend.EXPLICIT_CACHE, Backend.MODULE)
def remove_planned_heads(transform: Transform, target: RewriteTarget) -> None:
    """Remove every KV head the plan lists, proving the result against the zeroed-columns oracle.

    Shared by every torch backend (and by transforms outside kvpass that plan `pruned_heads`)."""
    pruned = {site.name: target.plan.pruned_heads[site.name] for site in target.sites
              if target.plan.pruned_heads.get(site.name)}
    if not pruned:
        return
    if getattr(target.model, "kvpass_heads_removed", 0):
        raise UnsupportedModelError("this model's heads were already removed by kvpass: structural transforms "
                                    "apply once; optimize the original model instead")
    sites = {site.name: site for site in target.sites}
    missing = [name for name in pruned if sites[name].projections is None]
    if missing:
        raise UnsupportedModelError(
            f"{type(transform).__name__}: the Q/K/V/O projections of sites {missing} were not found in the graph "
            "(weights that are not plain parameters, e.g. packed in-projection weights), so heads cannot be removed")
    inputs = _inputs_after_removal(target, pruned)
    run = lambda args, kwargs: _forward(target.model, args, kwargs)  # noqa: E731
    restores = [zero_output_columns(target.model, sites[name], heads) for name, heads in pruned.items()]
    try:
        reference = run(target.example_args, target.example_kwargs)
    finally:
        for restore in reversed(restores):
            restore()
    removed_parameters = 0
    for name, heads in pruned.items():
        undo, count = remove_kv_heads(target.model, sites[name], heads)
        target.undo.append(undo)
        removed_parameters += count
    exactness_check(lambda: run(*inputs), _outputs_after_removal(target, reference, pruned), type(transform).__name__)
    target.example_args, target.example_kwargs = inputs
    target.model.kvpass_heads_removed = removed_parameters
    target.undo.append(lambda: target.model.__dict__.pop("kvpass_heads_removed", None))


def _forward(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return model(*args, **kwargs)


def _inputs_after_removal(target: RewriteTarget, pruned: dict[str, list[int]]) -> tuple[tuple, dict]:
    """The example inputs the pruned model takes: an explicit-cache model's past K/V inputs lose
    the removed heads too (their placeholders are known from the sites' cache reads)."""
    if target.backend is not Backend.EXPLICIT_CACHE:
        return target.example_args, target.example_kwargs
    positions = {site.name: [site.match.cache.past_k_index, site.match.cache.past_v_index] for site in target.sites}
    return _drop_heads((target.example_args, target.example_kwargs), positions, pruned)


def _outputs_after_removal(target: RewriteTarget, reference: Any, pruned: dict[str, list[int]]) -> Any:
    """What the pruned model must return: the oracle's outputs, with an explicit-cache model's
    present K/V outputs minus the removed heads."""
    if target.backend is not Backend.EXPLICIT_CACHE:
        return reference
    positions = {site.name: site.match.cache.present_k_outputs + site.match.cache.present_v_outputs
                 for site in target.sites}
    return _drop_heads(reference, positions, pruned)


def _drop_heads(tree: Any, positions: dict[str, list[int]], pruned: dict[str, list[int]]) -> Any:
    """`tree` with its leaves at `positions[site]` (K/V caches [B, Hkv, T, D]) minus `pruned[site]` heads."""
    leaves, spec = torch.utils._pytree.tree_flatten(tree)
    for name, heads in pruned.items():
        for index in positions[name]:
            keep = [h for h in range(leaves[index].shape[1]) if h not in heads]
            leaves[index] = leaves[index][:, keep].contiguous()
    return torch.utils._pytree.tree_unflatten(leaves, spec)
