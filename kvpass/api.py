"""The public verbs: find_attention, plan and optimize.

The data path, top to bottom: capture the model (`kvpass.capture`), find its attention sites
(`kvpass.rewrites.fx`), plan every transform jointly (`kvpass.transforms.pipeline.solve`, using
`kvpass.planning` and `kvpass.calibration`), rewrite it through each transform's handler
(`kvpass.transforms.pipeline.apply`), and run it (`kvpass.runtime`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import torch

from kvpass.budget import parse_budget
from kvpass.calibration import Calibration
from kvpass.capture import capture, default_example_inputs, is_transformers_model
from kvpass.methods import Method
from kvpass.planning import Plan
from kvpass.rewrites.fx import find_sites
from kvpass.rewrites.vision_boundary import find_vision_boundary
from kvpass.runtime.interface_adapter import adapt_self_computing
from kvpass.site import SiteReport
from kvpass.stats import remember_calls
from kvpass.transforms import Backend, RewriteTarget, Transform
from kvpass.transforms.base import module_backend
from kvpass.transforms.pipeline import (
    apply,
    check_transforms,
    plan_transforms,
    shorthand_transforms,
    solve,
)
from kvpass.validation import integer


def find_attention(model: torch.nn.Module, *example_args: Any, **example_kwargs: Any) -> SiteReport:
    """Every attention computation in `model`'s graph, as a list of `AttentionSite`.

    The model is captured with `torch.export` (a concrete trace of the example call, then dynamo
    FX, as fallbacks; `report.capture_note` says why) and matched against kvpass's attention
    patterns. Attention-like subgraphs that no pattern supports are listed in `report.unsupported`,
    never dropped. Hugging Face models need no example inputs: a short `input_ids` is made up.

    Vision-language models captured with an image in the example inputs (e.g. a processor's
    output, as keywords) also get `report.vision`: where the image features enter the language
    model (`kvpass.anchors.VisionBoundary`); the report's sites are then the language model's, and
    the vision encoder's are listed in the anchor.

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
    captured = capture(model, args, kwargs, runnable=False)
    report = find_sites(captured.graph_module)
    report.capture, report.capture_note = captured.how, captured.note
    if is_transformers_model(model):
        from kvpass.hf_attention import annotate_windows

        annotate_windows(model, report)
    find_vision_boundary(captured.graph_module, report)
    return report


def optimize(
    model: torch.nn.Module,
    budget: float | str = 0.5,
    method: str | Method | None = None,
    example_inputs: tuple | Mapping[str, Any] | None = None,
    *,
    transforms: Sequence[Transform] | None = None,
    plan: Plan | None = None,
    calibration: Calibration | Sequence[str | torch.Tensor] | str | torch.Tensor | None = None,
    tokenizer: Any | None = None,
    allocation: str = "uniform",
    sinks: int = 4,
    recent: int = 32,
    evict_every: int = 1,
    **method_options: Any,
) -> torch.nn.Module:
    """Rewrite every attention site of `model` onto a physically pruned KV cache.

    Works in place and returns the model (like torchao's `quantize_`); on any error the
    model is left unchanged. `budget` is the cap on KV-cache bytes relative to the unmodified
    model, at prefill and as decoding goes on: a fraction, or an absolute cap per sequence with
    its unit ('2048 tokens', '1.5GiB'; see `plan`). It is shared by all `transforms`, applied
    structure first (`kvpass.PruneHeads`), eviction last (`kvpass.Evict`, which supplies the
    saving the others leave); if they cannot meet it, `optimize` raises. Without `transforms`
    it is `[kvpass.Evict(method, sinks=..., recent=..., evict_every=..., allocation=...,
    **method_options)]`: those keywords are shorthand, and an error with `transforms=`.
    `plan` (`kvpass.plan`, `Plan.load`) applies decisions made before. `calibration` /
    `tokenizer`: prompts for the transforms that calibrate (head importance, adaptive
    allocation); built-in prompts otherwise.

    Hugging Face causal LMs keep `generate` (greedy, sampling, batched with left padding); their
    attention modules that compute attention themselves (BLOOM, GPT-J, XGLM, ...) get an adapter as
    their forward, which runs their own code unchanged under the model's own implementation and
    reaches transformers' attention interface under kvpass's (`kvpass.runtime.interface_adapter`);
    models whose forward carries its own cache tensors keep their signature and return
    compacted caches (pass `example_inputs`); models with no KV cache (encoders) take
    structural transforms only, at `budget=1.0`. `kvpass.stats(model)` reports the last call.
    `example_inputs` is a tuple of positional arguments or a mapping of keyword arguments
    (a processor's output: `kvpass.PrunePatches` needs a vision-language model captured with
    an image, to find where image features enter its language model).

    Example:
        >>> import kvpass
        >>> model = kvpass.optimize(model, budget=0.5)          # doctest: +SKIP
        >>> out = model.generate(input_ids, max_new_tokens=32)  # doctest: +SKIP
        >>> model = kvpass.optimize(model, budget=0.5, transforms=[kvpass.PruneHeads(0.25), kvpass.Evict()])  # doctest: +SKIP
    """
    budget = parse_budget(budget)
    shorthand = {"sinks": sinks, "recent": recent, "evict_every": evict_every, "allocation": allocation}
    transforms = shorthand_transforms(transforms, plan, method, method_options, shorthand)
    _refuse_before_capture(model)
    # An optimized model is re-planned from the sites found the first time (its graph now holds kvpass ops).
    args, kwargs = _example_call(model, example_inputs)
    report = getattr(model, "kvpass_sites", None) or find_attention(model, *args, **kwargs)
    what = type(model).__name__
    report.require_rewritable(what)
    backend = module_backend(model, report)
    if backend is Backend.HF:
        adapt_self_computing(model, report)
    dtype_bytes = next(model.parameters()).element_size()
    if plan is not None:
        plan.check_model(list(report), dtype_bytes)
        transforms = plan_transforms(plan)
    transforms = check_transforms(transforms, report, backend, what)
    if backend is Backend.MODULE and budget.value != 1.0:
        raise ValueError(f"budget={budget.text} caps KV-cache bytes, but {what} keeps no KV cache: "
                         "use budget=1.0 with structural transforms such as kvpass.PruneHeads")
    if plan is None:
        plan = solve(model, report, budget, transforms, dtype_bytes=dtype_bytes, seq_len=_context_length(model),
                     calibration=calibration, tokenizer=tokenizer, previous=getattr(model, "kvpass_plan", None)
                     if getattr(model, "kvpass_heads_removed", 0) else None)
    target = RewriteTarget(model, report, plan, backend, args, kwargs)
    rewritten = apply(target, transforms, what)
    rewritten.kvpass_plan, rewritten.kvpass_sites = plan, report
    if backend is Backend.HF:
        remember_calls(rewritten, plan)
    return rewritten


def plan(
    model: torch.nn.Module,
    budget: float | str = 0.5,
    method: str | Method | None = None,
    calibration: Calibration | Sequence[str | torch.Tensor] | str | torch.Tensor | None = None,
    allocation: str = "adaptive",
    *,
    transforms: Sequence[Transform] | None = None,
    tokenizer: Any | None = None,
    seq_len: int | None = None,
    floor: float | None = None,
    ceiling: float = 1.0,
    sinks: int = 4,
    recent: int = 32,
    evict_every: int = 1,
    reallocate: int = 0,
    example_inputs: tuple | Mapping[str, Any] | None = None,
    **method_options: Any,
) -> Plan:
    """Choose every transform's decisions for `model` before any token runs; `optimize(model, plan=...)` applies them.

    `budget`: a fraction of the unmodified cache's bytes (`0.5`; `1` and `1.0` alike mean
    everything), or an absolute cap per sequence, `'2048 tokens'` (the bytes 2048 tokens take
    in the full cache) or a byte size (`'1.5GiB'`, `'512MB'`). Absolute budgets become per-site
    token caps that hold at every length; they are spread over the sites as a fraction budget
    would be at `seq_len` tokens (default: the model's `max_position_embeddings`). Sinks and the
    recent window are always inside the budget.

    Without `transforms`, the plan is for `[kvpass.Evict(method, allocation=..., floor=...,
    ceiling=..., sinks=..., recent=..., evict_every=..., reallocate=..., **method_options)]`.
    `allocation`: 'uniform' (every site alike), 'pyramid' (PyramidKV: linearly less with depth)
    or 'adaptive' (least total predicted attention-output error, from calibration; see
    `kvpass.planning.build_plan`), each site between `floor` (default: half the budget
    fraction) and `ceiling`. With `transforms=[kvpass.PruneHeads(0.25), kvpass.Evict(...)]`,
    head importance and the adaptive allocation share one calibration run.

    `calibration`: a `Calibration` already measured, or prompts for one (text needs
    `tokenizer`; token-id tensors otherwise); None uses built-in prompts. Calibration is run for
    'adaptive' and head importance, and for the others when prompts are given (to fill in the
    plan's entropy table). `reallocate=N` (off by default) re-spreads the same total budget
    between the sites every N decoded tokens (`kvpass.runtime.reallocation`; Hugging Face
    models, fraction budgets).

    Example:
        >>> import kvpass
        >>> plan = kvpass.plan(model, budget=0.5, tokenizer=tokenizer)   # doctest: +SKIP
        >>> print(plan.table()); plan.kv_bytes(4096) <= 0.5 * plan.full_kv_bytes(4096)  # doctest: +SKIP
        True
        >>> model = kvpass.optimize(model, plan=plan)                      # doctest: +SKIP
    """
    budget = parse_budget(budget)
    if seq_len is not None:
        seq_len = integer(seq_len, "seq_len", minimum=1)
    shorthand = {"allocation": allocation, "floor": floor, "ceiling": ceiling, "sinks": sinks, "recent": recent,
                 "evict_every": evict_every, "reallocate": reallocate}
    transforms = shorthand_transforms(transforms, None, method, method_options, shorthand, {"allocation": "adaptive"})
    _refuse_before_capture(model)
    report = getattr(model, "kvpass_sites", None)
    if report is None:
        args, kwargs = _example_call(model, example_inputs)
        report = find_attention(model, *args, **kwargs)
    what = type(model).__name__
    report.require_rewritable(what)
    backend = module_backend(model, report)
    if backend is Backend.HF:  # calibration reads attention through transformers' interface
        adapt_self_computing(model, report)
    transforms = check_transforms(transforms, report, backend, what)
    return solve(model, report, budget, transforms, dtype_bytes=next(model.parameters()).element_size(),
                 seq_len=seq_len if seq_len is not None else _context_length(model), calibration=calibration,
                 tokenizer=tokenizer)


def _refuse_before_capture(model: torch.nn.Module) -> None:
    """Transformers models whose config already says kvpass cannot compact their cache (encoder-decoders,
    latent attention, state-space layers) are refused by name, before a capture that might fail first."""
    if is_transformers_model(model) and hasattr(model, "generate"):
        from kvpass.runtime.hf_eviction import refuse_config

        refuse_config(model)


def _example_call(model: torch.nn.Module, example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of the example call: a tuple is positional, a mapping (e.g. a processor's output)
    keyword arguments; None makes up a short text input for a transformers model."""
    if example_inputs is None:
        return default_example_inputs(model)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    raise TypeError(f"example_inputs must be a tuple of positional arguments or a mapping of keyword arguments, "
                    f"got {type(example_inputs).__name__}")


def _context_length(model: torch.nn.Module) -> int | None:
    """The model's context length (spreads absolute budgets), when its config says."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    return getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
