"""The public verbs: find_attention, plan and optimize."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from kvpass.budget import Budget, parse_budget
from kvpass.calibration import Calibration, calibrate
from kvpass.capture import capture, default_example_inputs
from kvpass.methods import Method, get_method
from kvpass.plan import Plan, build_plan, check_schedule_options
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
    budget: float | str = 0.5,
    method: str | Method | None = None,
    example_inputs: tuple | None = None,
    *,
    plan: Plan | None = None,
    allocation: str = "uniform",
    sinks: int = 4,
    recent: int = 32,
    evict_every: int = 1,
    **method_options: Any,
) -> torch.nn.Module:
    """Rewrite every attention site of `model` onto a physically pruned KV cache.

    Works in place and returns the model (like torchao's `quantize_`); on any error the
    model is left unchanged. `budget` is the fraction of KV-cache bytes kept, a hard cap
    at prefill and as decoding goes on, or an absolute cap per sequence with its unit
    ('2048 tokens', '1.5GiB'; see `plan`); `allocation` spreads it over the sites
    ('uniform', 'pyramid' or 'adaptive', see `plan`), or pass a ready `plan`
    (`kvpass.plan`, `Plan.load`). `sinks` first tokens and the `recent` latest ones
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
    budget = parse_budget(budget)
    chosen = get_method(method, **method_options)
    check_schedule_options(sinks, recent, evict_every)
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of positional arguments, got {type(example_inputs).__name__}")

    # An optimized model is re-planned from the sites found the first time (its graph now holds kvpass ops).
    report = getattr(model, "kvpass_sites", None) or find_attention(model, *(example_inputs or ()))
    report.require_rewritable(type(model).__name__)
    if plan is None:
        plan = _plan_sites(model, report, budget, chosen, allocation, None, sinks=sinks, recent=recent,
                           evict_every=evict_every)
    plan.require_budgets(report)
    return rewrite_model(model, report, plan, example_inputs)


def plan(
    model: torch.nn.Module,
    budget: float | str = 0.5,
    method: str | Method | None = None,
    calibration: Calibration | Sequence[str | torch.Tensor] | str | torch.Tensor | None = None,
    allocation: str = "adaptive",
    *,
    tokenizer: Any | None = None,
    seq_len: int | None = None,
    floor: float | None = None,
    ceiling: float = 1.0,
    sinks: int = 4,
    recent: int = 32,
    evict_every: int = 1,
    reallocate: int = 0,
    example_inputs: tuple | None = None,
    **method_options: Any,
) -> Plan:
    """Choose a KV budget per attention site of `model`, before any token runs; `optimize(model, plan=...)` applies it.

    `budget`: a fraction of the full cache's bytes (`0.5`; `1` and `1.0` alike mean everything),
    or an absolute cap per sequence, `'2048 tokens'` (the bytes 2048 tokens take in the full
    cache) or a byte size (`'1.5GiB'`, `'512MB'`). Absolute budgets become per-site token caps
    that hold at every length; they are spread over the sites as a fraction budget would be at
    `seq_len` tokens (default: the model's `max_position_embeddings`). A site's cache is capped
    at the smaller of its fraction cap and its token cap. Sinks and the recent window are
    always inside the budget.

    `allocation`: 'uniform' (every site alike), 'pyramid' (PyramidKV: linearly less with depth)
    or 'adaptive' (least total predicted attention-output error, from calibration; see
    `kvpass.plan.build_plan`), each site between `floor` (default: half the budget fraction)
    and `ceiling`.

    `calibration`: a `Calibration` already measured, or prompts for one (text needs
    `tokenizer`; token-id tensors otherwise); None uses built-in prompts. Calibration is run for
    'adaptive', and for the others when prompts are given (to fill in the plan's entropy table).
    `reallocate=N` (off by default) re-spreads the same total budget between the sites every N
    decoded tokens, from how each site's attention output degrades on the queries that arrive
    (`kvpass.runtime.reallocation`); Hugging Face models, fraction budgets.

    Example:
        >>> import kvpass
        >>> plan = kvpass.plan(model, budget=0.5, tokenizer=tokenizer)   # doctest: +SKIP
        >>> print(plan.table()); plan.kv_bytes(4096) <= 0.5 * plan.full_kv_bytes(4096)  # doctest: +SKIP
        True
        >>> model = kvpass.optimize(model, plan=plan)                      # doctest: +SKIP
    """
    budget = parse_budget(budget)
    chosen = get_method(method, **method_options)
    check_schedule_options(sinks, recent, evict_every)
    report = getattr(model, "kvpass_sites", None) or find_attention(model, *(example_inputs or ()))
    report.require_rewritable(type(model).__name__)
    return _plan_sites(model, report, budget, chosen, allocation, calibration, tokenizer=tokenizer, seq_len=seq_len,
                       floor=floor, ceiling=ceiling, sinks=sinks, recent=recent, evict_every=evict_every,
                       reallocate=reallocate)


def _plan_sites(model, sites, budget: Budget, method: Method, allocation: str, calibration, *, tokenizer=None,
                seq_len=None, **options) -> Plan:
    """`build_plan` with what only the model knows: its dtype, context length and calibration."""
    if not isinstance(calibration, Calibration) and (allocation == "adaptive" or calibration is not None):
        calibration = calibrate(model, method, calibration, tokenizer=tokenizer, sites=sites,
                                sinks=options["sinks"], recent=options["recent"])
    if calibration is not None and calibration.method != method.name:
        raise ValueError(f"calibration was measured for method {calibration.method!r}, not {method.name!r}")
    config = getattr(model, "config", None)
    if seq_len is None and config is not None:
        seq_len = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    dtype_bytes = next(model.parameters()).element_size()
    return build_plan(list(sites), budget, method, allocation, calibration, dtype_bytes=dtype_bytes,
                      seq_len=seq_len, **options)


