"""ONNX rewrite of a plan whose KV heads keep different numbers of tokens (per-head budgets, streaming heads).

Such a site carries its cache between steps **packed**, as the torch `RaggedKV` does: K and V one
`[N, D]` row per kept (sequence, head, token), an int32 slot (and the carried statistic) per row,
and an int32 length per (sequence, head). Inside the step:

1. **Unpack** to `[B, Hkv, W, D]` with one Gather through a row index (rows past a head's length
   read a sentinel row: zero K/V, slot `NOT_A_ROW`). `W` is the same for every layer (the host
   feeds it: the longest head of any layer), so the model's one mask computation keeps its shapes.
2. **Attend** over `Concat(unpacked, new)` with the site's own mask, which replaces the model's:
   key j is visible to a query when it is a real token of that KV head (slot >= 0), or one of the
   step's tokens at or before the query (a padding query sees itself only), as the torch ragged
   attention masks. Standard `Attention` takes it as its boolean `attn_mask` [B, Hq, S, W+S],
   com.microsoft `MultiHeadAttention` as its `attention_bias`; a decomposed chain applies it in
   front of its Softmax.
3. **Keep**: on a step that evicts (the host's `evicting` flag, `HeadSchedule.due`), the same keep
   rule as torch: the method's ranking (`ranking_function`) and `RaggedKeep`, both exported from
   the torch code, over each head's tokens laid out as `RaggedKV`'s padded view (packed rows, then
   the step's tokens, padding at the end); otherwise every row (padding of a prefill included, as
   the torch tail holds it).
4. **Repack** the kept rows (NonZero → Gather): the present packed buffers and lengths.

Sites whose heads keep alike in a ragged plan (the layers without streaming heads) take the same
path with the uniform rule (`CompactedKV`'s top `keep` per head), so every pruned site of the graph
reads the shared width. Unpruned sites keep the graph's own `[B, Hkv, T, D]` cache and mask.
Refused by name: com.microsoft GroupQueryAttention (it masks by lengths: each row's keys are a
prefix of its cache, the same for every head) and attention nodes without a mask input.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import onnx_ir as ir
import torch

from kvpass.errors import UnsupportedModelError
from kvpass.methods import Method, Stat, get_method
from kvpass.planning import Plan, SiteSchedule
from kvpass.planning.head_schedule import HeadSchedule
from kvpass.rewrites.onnx import (
    MASK_INPUT,
    POSITION_INPUT,
    _attention_received,
    _Ops,
    _row_index,
    step_slots,
)
from kvpass.rewrites.onnx_scoring import DOMAIN, ranking_function, torch_function
from kvpass.runtime.ragged_keep import RaggedKeep, keep_rule
from kvpass.site import AttentionSite, SiteReport

NOT_A_ROW = -(2**30)
"""The slot of an unpacked position that holds no row (past a head's length); padding is -1 - slot."""
PARAMETERS = ("evicting", "seen", "width", "keep", "sinks", "recent", "streaming_sinks", "streaming_recent")
"""int64 [8] graph input per packed site, `kvpass_ragged_<layer>`: whether this step evicts; tokens seen
after it; the unpacked width; the uniform rule's keep; the ranking's carve-outs; the streaming window."""
RECENCY = get_method("streaming_llm")
"""How heads are ranked when the plan has no eviction method (streaming heads alone), as in torch."""
_SUPPORTED = ("onnx_attention", "eager_softmax_chain", "ms_multihead_attention")
_MASK_INPUT = {"onnx_attention": 3, "ms_multihead_attention": 5}
"""Which input of the node is the mask the rewrite replaces: attn_mask, or MultiHeadAttention's attention_bias."""


def rewrite_ragged_sites(model: ir.Model, sites: SiteReport, plan: Plan, dtype_bytes: int) -> list[dict]:
    """Rewrite every pruned site of `model` onto a packed cache; returns the Generator's metadata per site."""
    names = {value.name for value in model.graph.inputs}
    missing = [name for name in (POSITION_INPUT, MASK_INPUT) if name not in names]
    if missing:
        raise UnsupportedModelError(f"the ONNX graph has no {missing} input(s): a ragged cache (per-head budgets, "
                                    "streaming heads) needs explicit positions and the mask of the step's tokens")
    mask = next(value for value in model.graph.inputs if value.name == MASK_INPUT)
    meta = []
    for site in sites:
        schedule, heads = plan.schedule(site, dtype_bytes), plan.head_schedule(site, dtype_bytes)
        entry = {"name": site.name, "layer": site.layer, "kv_heads": site.num_kv_heads, "head_dim": site.head_dim,
                 **{key: getattr(site.match, key).name for key in ("past_key", "past_value", "present_key",
                                                                    "present_value")},
                 "schedule": asdict(schedule), "row": None, "pattern": site.pattern, "heads": None}
        if heads is not None or schedule.prunes:
            _refuse_unsupported(site)
            method = plan.method or RECENCY
            counts_stat = plan.method is not None and (heads.base.prunes if heads is not None else schedule.prunes)
            entry["heads"] = _heads_record(heads) if heads is not None else None
            entry.update(_add_packed_site(model, site, method, method.stat if counts_stat else Stat.NONE, heads,
                                          mask))
        meta.append(entry)
    model.graph.sort()  # the unpacking and the masks feed nodes that come before them in the graph
    return meta


def head_schedule(record: dict) -> HeadSchedule:
    """The `HeadSchedule` a site's metadata records (`rewrite_ragged_sites`)."""
    return HeadSchedule(**{**record, "base": SiteSchedule(**record["base"]), "streaming": tuple(record["streaming"])})


def _heads_record(heads: HeadSchedule) -> dict:
    return {**asdict(heads), "streaming": list(heads.streaming)}


def _refuse_unsupported(site: AttentionSite) -> None:
    if site.pattern not in _SUPPORTED:
        raise UnsupportedModelError(
            f"attention site {site.name!r} is a {site.pattern} node: kvpass's ONNX ragged cache (per-head budgets, "
            f"streaming heads) rewrites {list(_SUPPORTED)}, applying its own per-head mask; com.microsoft "
            "GroupQueryAttention masks by lengths (each row's keys a prefix of its cache), which cannot give KV "
            "heads different tokens: prune the unfused export, or fuse to MultiHeadAttention")
    anchor, index = site.match.anchor, _MASK_INPUT.get(site.pattern)
    if index is not None and (len(anchor.inputs) <= index or anchor.inputs[index] is None):
        raise UnsupportedModelError(f"{anchor.op_type} node {site.name!r} takes no mask input (input {index}), which a "
                                    "ragged cache replaces with its per-head mask: export with an explicit mask")


def _add_packed_site(model: ir.Model, site: AttentionSite, method: Method, stat_mode: Stat,
                     heads: HeadSchedule | None, mask: ir.Value) -> dict[str, str]:
    graph, x, layer = model.graph, site.match, site.layer
    o = _Ops(graph, f"kvpass/{layer}")
    dtype = x.past_key.dtype
    batch = x.past_key.shape[0] if x.past_key.shape else None

    def graph_input(name: str, data_type: ir.DataType, shape: list) -> ir.Value:
        value = ir.Value(name=f"kvpass_{name}_{layer}", type=ir.TensorType(data_type), shape=ir.Shape(shape))
        graph.inputs.append(value)
        return value

    rows = f"rows_{layer}"
    packed = {"key": graph_input("past_packed_key", dtype, [rows, site.head_dim]),
              "value": graph_input("past_packed_value", dtype, [rows, site.head_dim]),
              "slots": graph_input("past_packed_slots", ir.DataType.INT32, [rows])}
    if stat_mode.carried:
        packed["stat"] = graph_input("past_packed_stat", ir.DataType.FLOAT, [rows])
    lengths = graph_input("past_lengths", ir.DataType.INT32, [batch, site.num_kv_heads])
    params = graph_input("ragged", ir.DataType.INT64, [len(PARAMETERS)])
    splits = None if heads is None else graph_input("splits", ir.DataType.INT64,
                                                     [f"splits_{layer}", heads.budgeted + 1])
    p = {name: o("Gather", params, o.const(index), axis=0) for index, name in enumerate(PARAMETERS)}

    # 1. unpack to [B, Hkv, W, ...], rows past a head's length reading the sentinel row
    head_lengths = o("Unsqueeze", o("Cast", lengths, to=ir.DataType.INT64), o.const([-1]))  # [B, Hkv, 1]
    flat_lengths = o("Reshape", head_lengths, o.const([-1]))  # segments in (sequence, head) order, as RaggedKV
    starts = o("Reshape", o("CumSum", flat_lengths, o.const(np.int64(0)), exclusive=1), o("Shape", head_lengths))
    width = o("Range", o.const(np.int64(0)), p["width"], o.const(np.int64(1)))
    present = o("Less", width, head_lengths)  # [B, Hkv, W]
    sentinel = o("Squeeze", o.dim(packed["slots"], 0), o.const([0]))
    index = o("Where", present, o("Add", starts, width), sentinel)
    fill = {"key": np.zeros((1, site.head_dim), dtype.numpy()), "value": np.zeros((1, site.head_dim), dtype.numpy()),
            "slots": np.array([NOT_A_ROW], np.int32), "stat": np.zeros(1, np.float32)}
    unpacked = {kind: o("Gather", o("Concat", value, o.const(fill[kind]), axis=0), index, axis=0)
                for kind, value in packed.items()}
    for kind, past in (("key", x.past_key), ("value", x.past_value)):
        past.replace_all_uses_with(unpacked[kind])
        graph.inputs.remove(past)
    for present_value in (x.present_key, x.present_value):
        graph.outputs.remove(present_value)

    # 2. the site's own mask
    seen = p["seen"]
    steps = o("Squeeze", o.dim(x.present_key.producer().inputs[1], 2), o.const([0]))  # Concat(past, new)
    new_slots = step_slots(o, site, seen, steps, mask)  # [B, Hkv, S]
    cache_slots = o("Concat", unpacked["slots"], new_slots, axis=2)
    _apply_mask(o, site, _own_mask(o, site, unpacked["slots"], new_slots))

    # 3. what to keep, over each head's tokens laid out as the torch padded view
    cache_k, cache_v = x.present_key, x.present_value
    state = {"key": cache_k, "value": cache_v, "slots": cache_slots}
    if stat_mode.carried:
        new = o.dim(new_slots, 2)
        zeros = o("ConstantOfShape", o("Concat", o.dim(cache_k, 0), o.const([site.num_kv_heads]), new, axis=0))
        grown = o("Concat", unpacked["stat"], zeros, axis=2)
        state["stat"] = o("Add", grown, _attention_received(o, site, method, cache_k, cache_v, new_slots))
    view, source, rows = _torch_view(o, state, head_lengths, p["width"], o.dim(new_slots, 2))
    evicting = o("Cast", p["evicting"], to=ir.DataType.BOOL)
    rows_kept = o("Not", o("Equal", view["slots"], o.const(np.int32(NOT_A_ROW))))
    keep = o("If", evicting, then_branch=o.branch(
        "keep", lambda b: [_evict_keep(b, model, site, method, stat_mode, heads, view, source, rows, state,
                                      new_slots, p, splits, rows_kept)]),
        else_branch=o.branch("append", lambda b: [b("Identity", rows_kept)]))
    keep.dtype = ir.DataType.BOOL

    # 4. repack: the kept view positions, K and V read straight from the cache through the view's rows
    kept = o("Reshape", o("NonZero", o("Reshape", keep, o.const([-1]))), o.const([-1]))
    cache_rows = o("Gather", o("Reshape", rows, o.const([-1])), kept, axis=0)
    names = {"past_lengths": lengths.name, "params": params.name, "splits": splits.name if splits else None}
    for kind in packed:
        if kind in ("key", "value"):
            out = o("Gather", o("Reshape", state[kind], o.const([-1, site.head_dim])), cache_rows, axis=0)
        else:
            out = o("Gather", o("Reshape", view[kind], o.const([-1])), kept, axis=0)
        out.name, out.dtype = f"kvpass_present_packed_{kind}_{layer}", packed[kind].dtype
        out.shape = ir.Shape([f"kept_rows_{layer}", site.head_dim] if kind in ("key", "value") else
                             [f"kept_rows_{layer}"])
        graph.outputs.append(out)
        names[f"past_packed_{kind}"], names[f"present_packed_{kind}"] = packed[kind].name, out.name
    out = o("Cast", o("ReduceSum", o("Cast", keep, to=ir.DataType.INT64), o.const([-1]), keepdims=0),
            to=ir.DataType.INT32)
    out.name, out.dtype = f"kvpass_present_lengths_{layer}", ir.DataType.INT32
    out.shape = ir.Shape([batch, site.num_kv_heads])
    graph.outputs.append(out)
    names["present_lengths"] = out.name
    return names


def _own_mask(o: _Ops, site: AttentionSite, past_slots: ir.Value, new_slots: ir.Value) -> ir.Value:
    """bool [B, Hq, S, W + S]: each query head sees its KV head's real cached tokens, and the step's
    tokens up to itself (a padding query only itself)."""
    steps = o.dim(new_slots, 2)
    index = o("Range", o.const(np.int64(0)), o("Squeeze", steps, o.const([0])), o.const(np.int64(1)))
    causal = o("LessOrEqual", o("Unsqueeze", index, o.const([0])), o("Unsqueeze", index, o.const([1])))  # [S, S]
    itself = o("Equal", o("Unsqueeze", index, o.const([0])), o("Unsqueeze", index, o.const([1])))
    real = o("GreaterOrEqual", o("Slice", new_slots, o.const([0]), o.const([1]), o.const([1])),
             o.const(np.int32(0)))  # [B, 1, S]
    new_part = o("And", causal, o("Or", real, itself))  # [B, 1, S, S] by broadcasting
    batch = o.dim(past_slots, 0)
    shape = o("Concat", batch, o.const([site.num_heads]), steps, axis=0)
    past = o("GreaterOrEqual", past_slots, o.const(np.int32(0)))  # [B, Hkv, W]
    grouped = o("Expand", o("Unsqueeze", past, o.const([2, 3])),
                o("Concat", batch, o.const([site.num_kv_heads, site.group_size]), steps, o.const([1]), axis=0))
    past_part = o("Reshape", grouped, o("Concat", shape, o.const([-1]), axis=0))
    new_part = o("Expand", o("Unsqueeze", new_part, o.const([1])), o("Concat", shape, steps, axis=0))
    return o("Concat", past_part, new_part, axis=-1)


def _apply_mask(o: _Ops, site: AttentionSite, mask: ir.Value) -> None:
    """Make `mask` the site's attention mask in place of the model's."""
    anchor = site.match.anchor
    if site.pattern == "onnx_attention":
        anchor.replace_input_with(3, mask)
        return
    if site.pattern == "ms_multihead_attention":  # an additive bias in the query's type
        dtype = anchor.inputs[5].dtype.numpy() if anchor.inputs[5].dtype is not None else np.float32
        bias = o("Where", mask, o.const(np.array(0, dtype)), o.const(np.array(np.finfo(dtype).min, dtype)))
        anchor.replace_input_with(5, bias)
        return
    softmax = site.match.probs.producer()
    logits = softmax.inputs[0]
    producer = logits.producer()
    if producer is not None and producer.op_type == "Add" and producer.inputs[0].producer() is not None \
            and producer.inputs[0].producer().op_type in ("MatMul", "Mul", "Div"):
        logits = producer.inputs[0]  # the model's additive mask: replaced
    elif producer is not None and producer.op_type == "Where":
        logits = producer.inputs[1]
    lowest = np.array(-np.inf, logits.dtype.numpy() if logits.dtype is not None else np.float32)
    softmax.replace_input_with(0, o("Where", mask, logits, o.const(lowest)))


def _torch_view(o: _Ops, state: dict[str, ir.Value], head_lengths: ir.Value, width: ir.Value,
                steps: ir.Value) -> tuple[dict[str, ir.Value], ir.Value, ir.Value]:
    """The slots (and statistic) of `state` [B, Hkv, W + S] (unpacked past, then the step) laid out as
    `RaggedKV`'s padded view: each head's rows, then the step's tokens, then nothing (slot NOT_A_ROW).
    Span pooling ranks neighbours in this order, so the ONNX and torch rankings see the same
    neighbours. Also returns, per view position, its column in `state` and its row in the flattened
    [B x Hkv x (W + S), D] K/V (`view_rows`), through which K and V are read only where needed."""
    steps = o("Squeeze", steps, o.const([0]))
    total = o("Add", width, steps)
    position = o("Range", o.const(np.int64(0)), total, o.const(np.int64(1)))  # [W + S]
    held = o("Add", head_lengths, steps)  # [B, Hkv, 1]
    source = o("Where", o("Less", position, head_lengths), position,
               o("Where", o("Less", position, held), o("Add", width, o("Sub", position, head_lengths)), position))
    view = {"slots": o("Where", o("Less", position, held), o("GatherElements", state["slots"], source, axis=2),
                      o.const(np.int32(NOT_A_ROW)))}
    if "stat" in state:
        view["stat"] = o("GatherElements", state["stat"], source, axis=2)
    return view, source, _row_index(o, state["key"], source)


def _view_rows(o: _Ops, cache: ir.Value, rows: ir.Value) -> ir.Value:
    """K or V [B, Hkv, W + S, D] in the view's order."""
    dim = o.dim(cache, 3)
    return o("Reshape", o("Gather", o("Reshape", cache, o("Concat", o.const([-1]), dim, axis=0)), rows, axis=0),
             o("Concat", o("Shape", rows), dim, axis=0))

def _evict_keep(o: _Ops, model: ir.Model, site: AttentionSite, method: Method, stat_mode: Stat,
                heads: HeadSchedule | None, view: dict[str, ir.Value], source: ir.Value, rows: ir.Value,
                state: dict[str, ir.Value], new_slots: ir.Value, p: dict[str, ir.Value], splits: ir.Value | None,
                rows_kept: ir.Value) -> ir.Value:
    """bool [B, Hkv, W + S] the rows an eviction keeps: `RaggedKeep` (ragged sites) or the top `keep` per
    head (`CompactedKV`), over the view. K and V are laid out as the view only for a ranking that
    reads them (knorm, value norms; tova and h2o read the statistic alone)."""
    if stat_mode is Stat.NONE:
        stat = o("Cast", view["slots"], to=ir.DataType.FLOAT)  # no statistic: any float of the shape
    elif "stat" in view:
        stat = view["stat"]
    else:
        received = _attention_received(o, site, method, state["key"], state["value"], new_slots)
        stat = o("GatherElements", received, source, axis=2)
    opset, dtype = model.opset_imports[""], state["key"].dtype
    as_int32 = {name: o("Cast", p[name], to=ir.DataType.INT32) for name in ("seen", "sinks", "recent")}
    reads_cache = any(value.uses() for value in ranking_function(method, dtype, opset).inputs[:2])

    def ranking_inputs(heads_index: ir.Value | None) -> dict[str, ir.Value]:
        """The ranking's inputs over the view (of the heads `heads_index` picks, or all)."""
        pick = (lambda value: value) if heads_index is None else (
            lambda value: o("Gather", value, heads_index, axis=1))
        if reads_cache:
            key, value = (pick(_view_rows(o, state[kind], rows)) for kind in ("key", "value"))
        else:  # the function never reads them: an empty tensor of their type
            key = value = o.const(np.zeros((0, 0, 0, 0), dtype.numpy()))
        return {"key": key, "value": value, "slots": pick(view["slots"]), "stat": pick(stat)}

    def rank(rule: Method, chosen: dict[str, ir.Value]) -> ir.Value:
        function = ranking_function(rule, dtype, opset)
        model.functions[function.identifier()] = function
        model.opset_imports[DOMAIN] = 1
        return o(function.name, chosen["key"], chosen["value"], chosen["slots"], chosen["stat"], as_int32["seen"],
                 as_int32["sinks"], as_int32["recent"], domain=DOMAIN)

    if heads is None:
        scores = rank(method, ranking_inputs(None))
        _, top = o("TopK", scores, o("Reshape", p["keep"], o.const([1])), axis=-1, largest=1, sorted=1, outputs=2)
        zeros = o("ConstantOfShape", o("Shape", view["slots"]), value=ir.tensor(np.array([0], np.int64)))
        ones = o("ConstantOfShape", o("Shape", top), value=ir.tensor(np.array([1], np.int64)))
        chosen = o("Cast", o("ScatterElements", zeros, top, ones, axis=-1), to=ir.DataType.BOOL)
        return o("And", chosen, rows_kept)
    rule = keep_rule(heads)
    if rule.budgeted:
        pick = ranking_inputs(o.const(np.array(rule.budgeted, np.int64)))
        scores = rank(method, pick)
        own = rank(replace(method, shared_keep_set=False), pick) if heads.joint and method.shared_keep_set else scores
    else:  # no budgeted head: the rule reads none of these
        scores = own = o("Cast", view["slots"], to=ir.DataType.FLOAT)
    function = _keep_function(rule, opset)
    model.functions[function.identifier()] = function
    model.opset_imports[DOMAIN] = 1
    return o(function.name, scores, own, view["slots"], p["seen"], p["streaming_sinks"], p["streaming_recent"],
             splits, domain=DOMAIN)


_KEEP_FUNCTIONS: dict[tuple, ir.Function] = {}


def _keep_function(rule: RaggedKeep, opset: int) -> ir.Function:
    """`RaggedKeep` as an ONNX function (one export per head layout and opset)."""
    key = (tuple(rule.budgeted), len(rule.streaming_mask), rule.joint, opset)
    if key not in _KEEP_FUNCTIONS:
        batch, kv_heads, length = 2, len(rule.streaming_mask), 11
        budgeted = max(len(rule.budgeted), 1)
        example = (torch.rand(batch, budgeted, length), torch.rand(batch, budgeted, length),
                   torch.arange(length, dtype=torch.int32).expand(batch, kv_heads, length).contiguous(),
                   torch.tensor(20), torch.tensor(2), torch.tensor(3),
                   torch.ones(7, len(rule.budgeted) + 1, dtype=torch.long))
        b, t, c = torch.export.Dim("batch"), torch.export.Dim("tokens"), torch.export.Dim("counts")
        shapes = {"scores": {0: b, 2: t}, "own": {0: b, 2: t}, "slots": {0: b, 2: t}, "seen": None, "sinks": None,
                  "recent": None, "splits": {0: c}}
        _KEEP_FUNCTIONS[key] = torch_function(rule, example, shapes, list(shapes), "ragged_keep", repr(key), opset)
    return _KEEP_FUNCTIONS[key]
