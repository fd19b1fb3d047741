"""Evaluation settings: eviction methods written as specs ('tova:span=2'), planned at each budget.

A spec is a method name (or "default": `kvpass.DEFAULT_METHOD` with its default options) and,
after a colon, comma-separated options of that method. Every setting is planned uniformly, so
methods are compared at equal bytes per site; the full cache is the setting "full". One option
belongs to the plan, not the method: `streaming=F` makes the fraction F of the KV heads streaming
heads (`kvpass.StreamingHeads(F)`, chosen by calibration on kvpass's generated retrieval prompts)
before the method evicts within the budget.

Example:
    >>> parse_method("tova:span=4,page_size=8")
    ('tova', {'span': 4, 'page_size': 8})
    >>> parse_method("default")
    (None, {})
    >>> split_plan_options({"span": 2, "streaming": 0.8})
    ({'span': 2}, 0.8)
"""

from __future__ import annotations

from typing import Any

from kvpass.eval.report import FULL, label
from kvpass.methods import METHODS


def parse_method(spec: str) -> tuple[str | None, dict[str, Any]]:
    """(method name or None for the default, options) for `kvpass.plan`, from a spec."""
    name, _, text = spec.partition(":")
    if name != "default" and name not in METHODS:
        raise ValueError(f"method spec {spec!r}: unknown method {name!r}; expected default or one of "
                         f"{sorted(METHODS)}")
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if value in ("True", "False"):
            options[key] = value == "True"
            continue
        try:
            options[key] = float(value) if "." in value else int(value)
        except ValueError:
            raise ValueError(f"method spec {spec!r}: option {item!r} must be key=number or key=True/False") from None
    return (None if name == "default" else name), options


def split_plan_options(options: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """(the method's options, the streaming-head fraction or None) of a parsed spec."""
    options = dict(options)
    return options, options.pop("streaming", None)


def make_plans(model: Any, methods: list[str], budgets: list[float], tokenizer: Any = None) -> dict:
    """label -> Plan (uniform allocation) of an optimized `model`, with the full cache under "full".
    `tokenizer`: what a `streaming=` spec's calibration reads its text prompts with (None: token ids)."""
    import kvpass

    plans = {FULL: kvpass.plan(model, budget=1.0, allocation="uniform")}
    for spec in methods:
        method, options = parse_method(spec)
        options, streaming = split_plan_options(options)
        for budget in budgets:
            if streaming is None:
                plan = kvpass.plan(model, budget=budget, method=method, allocation="uniform", **options)
            else:
                plan = kvpass.plan(model, budget=budget, tokenizer=tokenizer, transforms=[
                    kvpass.StreamingHeads(streaming), kvpass.Evict(method, **options)])
            plans[label(spec, budget)] = plan
    return plans
