"""The public verbs: find_attention and optimize."""

from __future__ import annotations

import math
from typing import Any

import torch

from kvpass.capture import capture, default_example_inputs
from kvpass.errors import UnsupportedModelError
from kvpass.methods import Method, get_method
from kvpass.plan import Plan, uniform_plan
from kvpass.rewrites.fx import find_sites
from kvpass.runtime.rewrite import rewrite_model
from kvpass.site import SiteReport


def find_attention(model: torch.nn.Module, *example_args: Any, **example_kwargs: Any) -> SiteReport:
    """Every attention computation in `model`'s graph, as a list of `AttentionSite`.

    The model is captured with `torch.export` (dynamo FX as a fallback; `report.capture_note`
    says why) and matched against kvpass's attention patterns. Attention-like subgraphs that
    no pattern supports are listed in `report.unsupported`, never dropped. Hugging Face
    models need no example inputs: a short `input_ids` is made up.

    Example:
        >>> import torch, kvpass
        >>> mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        >>> x = torch.randn(1, 5, 32)
        >>> [s.num_heads for s in kvpass.find_attention(mha, x, x, x)]
        [4]
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = (example_args, example_kwargs) if (example_args or example_kwargs) else default_example_inputs(model)
    captured = capture(model, args, kwargs)
    report = find_sites(captured.graph_module)
    report.capture, report.capture_note = captured.how, captured.note
    return report


def optimize(
    model: torch.nn.Module,
    budget: float = 0.5,
    method: str | Method | None = None,
    example_inputs: tuple | None = None,
    *,
    plan: Plan | None = None,
    sinks: int = 4,
    recent: int = 32,
    evict_every: int = 1,
    **method_options: Any,
) -> torch.nn.Module:
    """Rewrite every attention site of `model` onto a physically pruned KV cache.

    Works in place and returns the model (like torchao's `quantize_`); on any error the
    model is left unchanged. `budget` is the fraction of KV-cache bytes kept, a hard cap
    at prefill and as decoding goes on; `sinks` first tokens and the `recent` latest ones
    are always kept, inside that cap. Eviction runs at most every `evict_every` steps
    (evicting a little deeper so the cap still holds in between). `method=None` is
    `kvpass.methods.DEFAULT_METHOD`; `method_options` go to the method's dataclass.

    Hugging Face causal LMs keep `generate` (greedy, sampling, batched with left
    padding); models whose forward carries its own cache tensors keep their signature
    and return compacted caches (pass `example_inputs`).

    Example:
        >>> import kvpass
        >>> model = kvpass.optimize(model, budget=0.5)          # doctest: +SKIP
        >>> out = model.generate(input_ids, max_new_tokens=32)  # doctest: +SKIP
    """
    budget = _check_budget(budget)
    chosen = get_method(method, **method_options)
    for name, value in (("sinks", sinks), ("recent", recent)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if isinstance(evict_every, bool) or not isinstance(evict_every, int) or evict_every < 1:
        raise ValueError(f"evict_every must be an int >= 1, got {evict_every!r}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of positional arguments, got {type(example_inputs).__name__}")

    # An optimized model is re-planned from the sites found the first time (its graph now holds kvpass ops).
    report = getattr(model, "kvpass_sites", None) or find_attention(model, *(example_inputs or ()))
    if report.unsupported:
        listed = "; ".join(f"{u.name} ({u.reason})" for u in report.unsupported)
        raise UnsupportedModelError(f"attention kvpass cannot rewrite, so the model is left unchanged: {listed}")
    if not report:
        raise UnsupportedModelError(f"no attention found in {type(model).__name__}: nothing to prune")
    if plan is None:
        plan = uniform_plan(list(report), budget, chosen, sinks=sinks, recent=recent, evict_every=evict_every)
    missing = {site.name for site in report} - set(plan.budgets)
    if missing:
        raise ValueError(f"plan has no budget for sites {sorted(missing)}")

    return rewrite_model(model, report, plan, example_inputs)


def _check_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a float in (0, 1], got {budget!r}")
    budget = float(budget)
    if math.isnan(budget) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1] (the fraction of KV-cache bytes kept), got {budget!r}")
    return budget
