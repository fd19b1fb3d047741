"""The kvpass verbs for ONNX graphs: find_attention, optimize, and a Generator to serve the result.

The pruned graph uses standard ONNX ops only (TopK, GatherElements, MaxPool, ...), so any
onnxruntime execution provider runs it; the Generator feeds the eviction sizes the torch
runtime would use (`kvpass.plan.SiteSchedule`), so both paths keep the same tokens under the
same plan (`evict_every` included: serving defaults to `SERVING_EVICT_EVERY`, the torch path to 1).

Example:
    >>> import kvpass.onnx
    >>> kvpass.onnx.find_attention("model.onnx")                      # doctest: +SKIP
    >>> pruned = kvpass.onnx.optimize("model.onnx", budget=0.5)        # doctest: +SKIP
    >>> kvpass.onnx.Generator(pruned).generate(ids, max_new_tokens=32)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from kvpass.budget import parse_budget
from kvpass.methods import Method
from kvpass.onnx.ort_schemas import register_onnxruntime_schemas
from kvpass.planning import Plan
from kvpass.rewrites.onnx import find_sites
from kvpass.rewrites.onnx_gqa import drop_gqa_repeats
from kvpass.site import SiteReport
from kvpass.transforms import Backend, RewriteTarget, StreamingHeads, Transform
from kvpass.transforms.pipeline import apply, check_transforms, plan_transforms, shorthand_transforms, solve

SERVING_EVICT_EVERY = 16
"""`optimize`'s default `evict_every`: an onnxruntime decode step that evicts pays a TopK and a gather
of the whole cache, so serving evicts every 16 steps (`benchmarks/onnx_serving.py`: ms/step against 1)."""
_SERVING_DEFAULTS = {"evict_every": SERVING_EVICT_EVERY}
"""The shorthand defaults of `optimize` and `plan` that differ from `kvpass.Evict`'s."""

ModelLike = onnx.ModelProto | str | os.PathLike


def load(model: ModelLike) -> onnx.ModelProto:
    """`model` as a checked ModelProto; a clear error names the file when it cannot be read."""
    if isinstance(model, onnx.ModelProto):
        proto, where = model, "the given ModelProto"
    elif isinstance(model, (str, os.PathLike)):
        where = os.fspath(model)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"model: no ONNX file at {where!r}")
        try:
            proto = onnx.load(where)
        except Exception as error:  # protobuf raises DecodeError, RuntimeWarning, ...
            reason = f"{type(error).__name__}: {error}"
            raise ValueError(f"model: {where!r} is not a readable ONNX file ({reason})") from error
    else:
        raise TypeError(f"model must be an onnx.ModelProto or a path, got {type(model).__name__}")
    register_onnxruntime_schemas()  # graphs fused for onnxruntime use its SimplifiedLayerNormalization, ...
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        raise ValueError(f"model: {where} is not a valid ONNX model: {str(error).splitlines()[0]}") from error
    return proto


def find_attention(model: ModelLike) -> SiteReport:
    """Every attention site of an ONNX model, as `AttentionSite`s (plus `.unsupported`).

    Example:
        >>> report = kvpass.onnx.find_attention("model.onnx")    # doctest: +SKIP
        >>> [(s.layer, s.num_heads, s.num_kv_heads, s.pattern) for s in report]  # doctest: +SKIP
        [(0, 4, 2, 'onnx_attention'), (1, 4, 2, 'onnx_attention')]
    """
    return find_sites(_to_ir(load(model)))


def optimize(
    model: ModelLike,
    budget: float | str = 0.5,
    method: str | Method | None = None,
    *,
    transforms: list[Transform] | None = None,
    plan: Plan | None = None,
    sinks: int = 4,
    recent: int = 32,
    evict_every: int = SERVING_EVICT_EVERY,
    **method_options: Any,
) -> onnx.ModelProto:
    """A copy of `model` whose attention sites evict to the budget (same knobs as `kvpass.optimize`;
    `budget` a fraction, or '2048 tokens' / '512MB' per sequence). Serve it with
    `kvpass.onnx.Generator`, which feeds the eviction sizes. A step that evicts returns the compacted
    cache as `kvpass_evicted_key_i` / `kvpass_evicted_value_i` (empty on steps that only append, when
    the graph's `present` K/V are the cache).

    `transforms`: ONNX graphs take `kvpass.Evict` and `kvpass.StreamingHeads` (with
    `importance='random'`; calibrated heads come from a torch plan: `kvpass.export_onnx` of an optimized
    model). Per-head budgets and streaming heads give packed caches (`kvpass.rewrites.onnx_ragged`).
    Remove heads in torch before export: `kvpass.export_onnx` of a head-pruned model gives a smaller
    graph. `evict_every=N` evicts at most every N steps, deep enough that the budget still holds while the cache grows in between;
    those steps skip scoring, TopK and the gathers (the graph's `If` just appends), which is what
    makes decoding over the pruned cache faster than the full one: the default is
    `SERVING_EVICT_EVERY` (16; `benchmarks/onnx_serving.py` measures it against 1), where the torch
    `kvpass.optimize` evicts every step.

    A GQA repeat of the cache in front of a standard `Attention` (what the exporter writes for `repeat_kv`)
    is removed: the op reads grouped K/V heads itself (`kvpass.rewrites.onnx_gqa`).

    The graph must take `position_ids` and carry its cache as `Concat(past input, new)` graph
    outputs (what `kvpass.export_onnx` exports), or as a com.microsoft `GroupQueryAttention`'s past
    inputs and present outputs. Graphs fused for onnxruntime keep their fused ops: `MultiHeadAttention`
    over `Concat(past, new)` K/V (onnxscript's `ort_fusions` of an opset-18 export) and
    `GroupQueryAttention` with `do_rotary=0` and its lengths computed from `attention_mask`; scores
    come from a companion softmax of the op's inputs. Refused with a clear error: no attention,
    attention-like subgraphs no pattern matches, com.microsoft `Attention`, `GroupQueryAttention`
    with `do_rotary=1` (it rotates at `seqlens_k`, which counts kept tokens after compaction), packed
    QKV or fed lengths, `MultiHeadAttention` taking past K/V, a bias or a key padding mask, opset < 18,
    a method whose torch scoring does not export to ONNX. Every built-in method exports; h2o's and snapkv's
    running attention sums are carried as graph state (`kvpass_past_stat_i` in, `kvpass_present_stat_i`
    out), counted in the byte cap as in the torch runtime.

    Example:
        >>> pruned = kvpass.onnx.optimize("model.onnx", budget=0.5)   # doctest: +SKIP
        >>> onnx.save(pruned, "model.pruned.onnx")                      # doctest: +SKIP
    """
    budget = parse_budget(budget)
    shorthand = {"sinks": sinks, "recent": recent, "evict_every": evict_every}
    transforms = shorthand_transforms(transforms, plan, method, method_options, shorthand, _SERVING_DEFAULTS)
    graph = _to_ir(load(model))
    drop_gqa_repeats(graph)  # the standard Attention reads grouped heads itself: no per-step copy of the cache
    report = _rewritable_sites(graph)
    if plan is not None:
        plan.check_model(list(report), np.dtype(report[0].dtype).itemsize)
        if plan.reallocate:
            raise ValueError(f"plan.reallocate={plan.reallocate}: re-allocation while decoding runs in the torch "
                             "runtime only; an ONNX graph keeps each site's budget fixed (make the plan with "
                             "reallocate=0)")
        transforms = check_transforms(plan_transforms(plan), report, Backend.ONNX, "the ONNX graph")
    else:
        plan, transforms = _solve(report, budget, transforms)
    apply(RewriteTarget(graph, report, plan, Backend.ONNX), transforms, "the ONNX graph")
    proto = ir.to_proto(graph)
    onnx.checker.check_model(proto)
    return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)


def plan(
    model: ModelLike,
    budget: float | str = 0.5,
    method: str | Method | None = None,
    *,
    transforms: list[Transform] | None = None,
    sinks: int = 4,
    recent: int = 32,
    evict_every: int = SERVING_EVICT_EVERY,
    **method_options: Any,
) -> Plan:
    """The plan `optimize` would apply to `model` (same arguments); `optimize(model, plan=...)` applies it.

    An ONNX graph cannot be calibrated, so its budget is spread uniformly (or as the Evict
    transform's `allocation='pyramid'` says); plan the torch model for an adaptive allocation.

    Example:
        >>> plan = kvpass.onnx.plan("model.onnx", budget=0.25)         # doctest: +SKIP
        >>> print(plan.table())                                          # doctest: +SKIP
    """
    budget = parse_budget(budget)
    shorthand = {"sinks": sinks, "recent": recent, "evict_every": evict_every}
    transforms = shorthand_transforms(transforms, None, method, method_options, shorthand, _SERVING_DEFAULTS)
    return _solve(_rewritable_sites(_to_ir(load(model))), budget, transforms)[0]


def _rewritable_sites(graph: ir.Model) -> SiteReport:
    report = find_sites(graph)
    report.require_rewritable("the ONNX graph")
    return report


def _solve(report: SiteReport, budget, transforms: list[Transform]) -> tuple[Plan, list[Transform]]:
    transforms = check_transforms(transforms, report, Backend.ONNX, "the ONNX graph")
    calibrated = [t for t in transforms if isinstance(t, StreamingHeads) and t.importance != "random"]
    if calibrated:
        raise ValueError(f"StreamingHeads(importance={calibrated[0].importance!r}) calibrates the torch model; on an "
                         "ONNX graph choose importance='random', or plan the torch model and export it "
                         "(kvpass.export_onnx)")
    if any(getattr(t, "allocation", "uniform") == "adaptive" for t in transforms):
        raise ValueError("allocation='adaptive' calibrates the torch model; an ONNX graph is planned 'uniform' or "
                         "'pyramid' (or plan the torch model and export it)")
    if any(getattr(t, "head_allocation", "joint") == "calibrated" for t in transforms):
        raise ValueError("Evict(head_allocation='calibrated') calibrates the torch model; on an ONNX graph use "
                         "head_allocation='joint', or plan the torch model and export it (kvpass.export_onnx)")
    return solve(None, report, budget, transforms, dtype_bytes=np.dtype(report[0].dtype).itemsize), transforms


def _to_ir(proto: onnx.ModelProto) -> ir.Model:
    """Shape-inferred IR (head counts and dims are read off value shapes)."""
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


from kvpass.onnx.generator import Generator  # noqa: E402  (the generator uses `load` above)

__all__ = ["find_attention", "plan", "optimize", "load", "Generator"]
