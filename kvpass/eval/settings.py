"""Evaluation settings: eviction methods written as specs ('tova:span=2'), planned at each budget.

A spec is a method name (or "default": `kvpass.DEFAULT_METHOD` with its default options) and,
after a colon, comma-separated options of that method. Every setting is planned uniformly, so
methods are compared at equal bytes per site; the full cache is the setting "full".

Example:
    >>> parse_method("tova:span=4,page_size=8")
    ('tova', {'span': 4, 'page_size': 8})
    >>> parse_method("default")
    (None, {})
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


def make_plans(model: Any, methods: list[str], budgets: list[float]) -> dict:
    """label -> Plan (uniform allocation) of an optimized `model`, with the full cache under "full"."""
    import kvpass

    plans = {FULL: kvpass.plan(model, budget=1.0, allocation="uniform")}
    for spec in methods:
        method, options = parse_method(spec)
        for budget in budgets:
            plans[label(spec, budget)] = kvpass.plan(model, budget=budget, method=method, allocation="uniform",
                                                     **options)
    return plans
