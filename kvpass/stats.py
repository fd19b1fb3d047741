"""`kvpass.stats`: what one call of an optimized model held, read off that call's own cache.

Figures come from the cache object of a call, never from state shared between calls, so two
concurrent generations report their own numbers. For a model, a forward hook `optimize`
installs takes the figures of each completed forward from its cache (a few dozen tensor
sizes, so the cache itself is not kept alive after `generate` returns).
"""

from __future__ import annotations

from typing import Any

import torch

from kvpass.memory import cache_bytes
from kvpass.planning import Plan
from kvpass.runtime.call_arguments import given_cache, output_cache
from kvpass.transforms.pipeline import plan_transforms

PLAN_ATTRIBUTE = "_kvpass_plan"
"""Set on each cache a call of an optimized model used: the plan it ran under."""
LAST_STATS_ATTRIBUTE = "_kvpass_last_stats"
HOOK_ATTRIBUTE = "_kvpass_stats_hook"


def remember_calls(model: torch.nn.Module, plan: Plan) -> None:
    """Install (replacing an earlier one) the forward hook that tags each call's cache with `plan`
    and keeps that call's figures."""
    previous = model.__dict__.pop(HOOK_ATTRIBUTE, None)
    if previous is not None:
        previous.remove()
    transforms = plan_transforms(plan)

    def remember(module, args, kwargs, output) -> None:
        if torch.compiler.is_compiling():  # a compiled whole-model call is not recorded
            return
        cache = given_cache(kwargs) or output_cache(output)
        if cache is not None and hasattr(cache, "layers"):
            setattr(cache, PLAN_ATTRIBUTE, plan)
            module.__dict__[LAST_STATS_ATTRIBUTE] = _figures(cache, plan, transforms)

    model.__dict__[HOOK_ATTRIBUTE] = model.register_forward_hook(remember, with_kwargs=True)


def stats(model_or_cache: Any) -> dict[str, Any]:
    """Bytes held and each transform's figures for the last call of an optimized model, or for one cache.

    Returns `{"kv_bytes", "full_kv_bytes" (the unmodified model's cache at the same length),
    "sites": {name: {"kv_bytes", "tokens_held" (the longest head), "seen", "kv_heads", "head_tokens"
    ([B][Hkv] tokens per head: they differ with per-head budgets and streaming heads)}}, <transform name>: {...}}`.

    Example:
        >>> model = kvpass.optimize(model, budget=0.5)             # doctest: +SKIP
        >>> model.generate(ids, max_new_tokens=8)                   # doctest: +SKIP
        >>> kvpass.stats(model)["kv_bytes"] <= 0.5 * kvpass.stats(model)["full_kv_bytes"]  # doctest: +SKIP
        True
    """
    if isinstance(model_or_cache, torch.nn.Module):
        model = model_or_cache
        if getattr(model, "kvpass_plan", None) is None:
            raise ValueError(f"model_or_cache: {type(model).__name__} was not optimized by kvpass")
        figures = model.__dict__.get(LAST_STATS_ATTRIBUTE)
        if figures is None:
            raise ValueError("model_or_cache: no call of this model has completed with a cache since it was "
                             "optimized; call it with use_cache=True (generate does), or pass a cache")
        return figures
    cache = model_or_cache
    if not hasattr(cache, "layers"):
        raise TypeError(f"model_or_cache must be an optimized model or a transformers Cache, got {type(cache).__name__}")
    plan = getattr(cache, PLAN_ATTRIBUTE, None)
    return _figures(cache, plan, plan_transforms(plan) if plan is not None else [])


def _figures(cache: Any, plan: Plan | None, transforms: list) -> dict[str, Any]:
    figures: dict[str, Any] = {"kv_bytes": cache_bytes(cache), "full_kv_bytes": 0, "sites": {}}
    sites = plan.sites if plan is not None and len(plan.sites) == len(cache.layers) else [None] * len(cache.layers)
    for layer, planned in zip(cache.layers, sites):
        site = getattr(layer, "site", None) or planned
        site_cache = getattr(layer, "site_cache", None)
        tensors = site_cache.tensors() if site_cache is not None else [t for t in (layer.keys, layer.values) if t is not None]
        if not tensors:
            continue
        seen = layer.get_seq_length()
        held = cache_bytes(tensors)
        keys = tensors[0]
        lengths = site_cache.head_lengths() if site_cache is not None else torch.full(keys.shape[:2], keys.shape[-2])
        full = held if site is None else lengths.shape[0] * seen * 2 * site.num_kv_heads * site.head_dim * keys.element_size()
        figures["full_kv_bytes"] += full
        figures["sites"][site.name if site is not None else str(len(figures["sites"]))] = {
            "kv_bytes": held, "tokens_held": int(lengths.max()), "seen": int(seen), "kv_heads": int(lengths.shape[1]),
            "head_tokens": lengths.tolist()}
    for transform in transforms:
        figures[transform.name] = transform.stats(plan, cache)
    return figures
