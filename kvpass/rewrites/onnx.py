"""ONNX graph pass: find attention with onnxscript rewriter patterns, rewrite it onto a compacted cache.

Finding: every attention form is an `onnxscript.rewriter.pattern` (a small traced
function), tried against every node of an `onnx_ir` graph:

* `Attention` of the standard domain (opset 23/24; what `torch.onnx.export(dynamo=True)`
  emits for SDPA), with or without the GQA Unsqueeze → Expand → Reshape in front of K/V;
* the `com.microsoft` fused ops `MultiHeadAttention`, `GroupQueryAttention`, `Attention`;
* decomposed chains MatMul → (Mul | Div) → (Add mask | Where) → Softmax → [NaN guard] → MatMul
  (opset <= 22 exports), scale applied before or after the QK product.

Rewriting (standard ops only, so any execution provider runs it): a site whose K/V are
`Concat(past graph input, new)` graph outputs (or, for `GroupQueryAttention`, the op's own
past inputs and present outputs) gets an `If` after its attention. When the
host's `keep` is below the cache length, its branch scores the cache with the method's
statistic (the newest query's attention: a row of the Softmax output, a one-query copy of
the `Attention` node, or for the com.microsoft ops, which keep their probabilities inside, a
companion softmax of the op's own query and keys; never the whole L x T matrix; key norms;
or slots), applies the shared
selection rules of `kvpass.methods.selection` (head averaging, span max-pooling, +inf for
sinks and the recent window), keeps the top `keep` with TopK (ties → earlier token), sorts
the kept indices ascending and gathers the compacted K/V (outputs `kvpass_evicted_{key,value}_i`)
and int32 slots; otherwise those outputs are empty and the graph's own `present` K/V (past + new,
never copied through the `If`) are the cache, so steps between evictions (`evict_every` > 1) only append. The fused
ops keep attending over the compacted cache: `MultiHeadAttention` reads its lengths off its
inputs and its mask from `attention_bias`, `GroupQueryAttention` from `seqlens_k` and
`total_sequence_length`, which the graph must compute from `attention_mask` (the physical cache).
`keep`, `sinks`, `recent` and `seen` come from the host (input `kvpass_evict`, one row per
pruned site), computed with `kvpass.plan.SiteSchedule`, so the keep count is the torch runtime's.
The new tokens' slots are their places in the sequence (from `seen`), negative for padding (the
new columns of the graph's `attention_mask`, when it has one), as the torch runtime labels them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape
from onnxscript.rewriter import pattern

from kvpass.errors import UnsupportedModelError
from kvpass.methods import Method, Stat
from kvpass.planning import Plan
from kvpass.rewrites.onnx_scoring import ranking_function
from kvpass.site import AttentionSite, SiteReport, UnsupportedAttention

METADATA_KEY = "kvpass"
"""model.metadata_props key holding the JSON the Generator needs (I/O names, schedules)."""
EVICT_INPUT = "kvpass_evict"
"""int64 [pruned sites, 4] graph input: (keep, sinks, recent, seen) per pruned site."""
POSITION_INPUT = "position_ids"
MASK_INPUT = "attention_mask"
"""Optional [batch, cached + new] graph input, 0 for padding: the new tokens' columns mark which are padding."""
MIN_OPSET = 18
"""ReduceMean/ReduceL2 take axes as inputs from opset 18 on; older graphs are refused."""


# ---------------------------------------------------------------- patterns (data, not walks)

def _repeat_kv(op, x):
    """GQA/MQA: K/V repeated to the query heads (Unsqueeze → Expand → Reshape), or used as is."""
    return pattern.OrValue([op.Reshape(op.Expand(op.Unsqueeze(x, pattern.ANY_VALUE), pattern.ANY_VALUE),
                                       pattern.ANY_VALUE), x])


def _onnx_attention(op, q, k, v):
    return op.Attention(q, _repeat_kv(op, k), _repeat_kv(op, v), _allow_other_inputs=True,
                        _allow_other_attributes=True, _outputs=["anchor"])


def _contrib(op_type: str) -> Callable:
    def contrib_attention(op, q):
        return getattr(op, op_type)(q, _domain="com.microsoft", _allow_other_inputs=True,
                                    _allow_other_attributes=True, _outputs=["anchor"])
    return contrib_attention


def _sequence_major(op, x):
    """MultiHeadAttention's [B, T, H*D] key/value made from a [B, Hkv, T, D] cache (repeated for GQA,
    Transpose, Reshape: onnxscript's `ort_fusions` write it), or taken as is."""
    return pattern.OrValue([op.Reshape(op.Transpose(_repeat_kv(op, x)), pattern.ANY_VALUE), x])


def _multihead_attention(op, q, k, v):
    return op.MultiHeadAttention(q, _sequence_major(op, k), _sequence_major(op, v), _domain="com.microsoft",
                                 _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["anchor"])


def _decomposed(op, q, k, v, q_scale, k_scale, post_scale, post_div, mask, where_cond, where_fill, nan_fill):
    k_t = pattern.OrValue([
        op.Transpose(_repeat_kv(op, k)),
        op.Reshape(op.Transpose(op.Reshape(_repeat_kv(op, k), pattern.ANY_VALUE)), pattern.ANY_VALUE),
    ])
    scores = op.MatMul(pattern.OrValue([op.Mul(q, q_scale), q]), pattern.OrValue([op.Mul(k_t, k_scale), k_t]))
    scaled = pattern.OrValue([op.Mul(scores, post_scale), op.Div(scores, post_div), scores])
    masked = pattern.OrValue([op.Add(scaled, mask), op.Where(where_cond, scaled, where_fill), scaled])
    probs = op.Softmax(masked, _outputs=["probs"])
    guarded = pattern.OrValue([op.Where(op.IsNaN(probs), nan_fill, probs), probs])
    return op.MatMul(guarded, _repeat_kv(op, v), _outputs=["anchor"])


PATTERNS: dict[str, pattern.Pattern] = {
    "onnx_attention": pattern.Pattern(_onnx_attention, name="onnx_attention"),
    "ms_multihead_attention": pattern.Pattern(_multihead_attention, name="ms_multihead_attention"),
    "ms_group_query_attention": pattern.Pattern(_contrib("GroupQueryAttention"), name="ms_group_query_attention"),
    "ms_attention": pattern.Pattern(_contrib("Attention"), name="ms_attention"),
    "eager_softmax_chain": pattern.Pattern(_decomposed, name="eager_softmax_chain"),
}
"""Every attention form kvpass knows in ONNX, tried in this order on each node."""

_CACHE_CONCAT = pattern.Pattern(lambda op, past, new: op.Concat(past, new, _allow_other_attributes=True),
                                name="cache_concat")
"""A site reads a cache when its K/V are Concat(past graph input, new) along the sequence axis."""


# ---------------------------------------------------------------- finding

def find_sites(model: ir.Model) -> SiteReport:
    """Every attention site of `model`'s main graph, in graph order, plus what looked like attention."""
    graph, sites, covered = model.graph, [], set()
    for node in graph:
        if id(node) in covered:
            continue
        for name, rule in PATTERNS.items():
            match = rule.match(model, graph, node, check_nodes_are_removable=False)
            if match:
                site = _site_from_match(model, name, match, len(sites))
                sites.append(site)
                covered.update(id(n) for n in match.nodes)
                break
    unsupported = [
        UnsupportedAttention(node.name, "softmax_chain", "Softmax feeding a MatMul that no attention pattern matched",
                             [node.name])
        for node in graph
        if node.op_type == "Softmax" and id(node) not in covered
        and any(user.op_type == "MatMul" for user, _ in node.outputs[0].uses())
    ]
    return SiteReport(sites, unsupported, capture="onnx_ir")


@dataclass
class OnnxMatch:
    """Where a site lives in one `onnx_ir` graph: what the rewrite reads."""

    anchor: ir.Node
    """The attention node (Attention, a com.microsoft op, or the probs x V MatMul)."""
    probs: ir.Value | None
    """The Softmax output of a decomposed chain (None for fused attention nodes)."""
    past_key: ir.Value | None = None
    present_key: ir.Value | None = None
    past_value: ir.Value | None = None
    present_value: ir.Value | None = None


def _site_from_match(model: ir.Model, name: str, match, layer: int) -> AttentionSite:
    b = match.bindings
    anchor = b["anchor"].producer()
    attrs = {key: attr.value for key, attr in anchor.attributes.items()}
    found = OnnxMatch(anchor, b.get("probs"))
    if name == "ms_multihead_attention":
        heads, hidden = int(attrs.get("num_heads", 0)), _dim(b["q"], -1)
        head_dim = hidden // heads if hidden and heads else 0
        if b["k"] is not anchor.inputs[1] and b["v"] is not anchor.inputs[2]:  # laid out from [B, Hkv, T, D] caches
            found.past_key, found.present_key = _cache_of(model, b["k"])
            found.past_value, found.present_value = _cache_of(model, b["v"])
        reads_cache = found.past_key is not None and found.past_value is not None
        kv_heads = _dim(b["k"], 1) if reads_cache else heads
        scale, masked = attrs.get("scale") or None, any(i is not None for i in anchor.inputs[4:6])
        causal = bool(attrs.get("unidirectional", 0)) or reads_cache
    elif name == "ms_group_query_attention":
        heads, kv_heads, hidden = int(attrs.get("num_heads", 0)), int(attrs.get("kv_num_heads", 0)), _dim(b["q"], -1)
        packed = heads + 2 * kv_heads if anchor.inputs[1] is None else heads  # query holds Q, K and V when packed
        head_dim = hidden // packed if hidden and packed else 0
        inputs, outputs = list(anchor.inputs) + [None] * 5, list(anchor.outputs) + [None] * 3
        past, present = inputs[3:5], outputs[1:3]
        if all(v is not None and v.is_graph_input() for v in past) and all(
                v is not None and v.is_graph_output() for v in present):
            found.past_key, found.past_value, found.present_key, found.present_value = *inputs[3:5], *outputs[1:3]
        reads_cache = found.past_key is not None
        scale, masked, causal = attrs.get("scale") or None, True, True  # seqlens_k masks, causally
    elif name.startswith("ms_"):
        heads = int(attrs.get("num_heads", 0))
        kv_heads = int(attrs.get("kv_num_heads", heads))
        hidden = _dim(b["q"], -1)
        head_dim = hidden // heads if hidden and heads else 0
        scale, masked = attrs.get("scale") or None, any(i is not None for i in anchor.inputs[3:5])
        causal, reads_cache = bool(attrs.get("unidirectional", 0)), False
    else:
        q, k = b["q"], b["k"]
        heads, head_dim = _dim(q, 1) or int(attrs.get("q_num_heads", 0)), _dim(q, -1)
        kv_heads = _dim(k, 1) or int(attrs.get("kv_num_heads", 0))
        scale = _scale(name, attrs, b)
        masked = b.get("mask") is not None or b.get("where_cond") is not None or (
            name == "onnx_attention" and len(anchor.inputs) > 3 and anchor.inputs[3] is not None)
        found.past_key, found.present_key = _cache_of(model, b["k"])
        found.past_value, found.present_value = _cache_of(model, b["v"])
        reads_cache = found.past_key is not None and found.past_value is not None
        causal = bool(attrs.get("is_causal", 0)) or reads_cache  # a decoder reading a growing cache is causal
    dtype = b.get("q").dtype if b.get("q") is not None and b.get("q").dtype is not None else ir.DataType.FLOAT
    return AttentionSite(
        name=anchor.name or f"attention_{layer}", layer=layer, num_heads=heads, num_kv_heads=kv_heads or heads,
        head_dim=head_dim, scale=scale, causal=causal, cross=False, masked=masked, reads_cache=reads_cache,
        pattern=name, dtype=dtype.numpy().name, nodes=[n.name for n in match.nodes], match=found,
    )


def _dim(value: ir.Value | None, axis: int) -> int:
    """A static dimension of `value`, or 0 when unknown."""
    if value is None or value.shape is None or len(value.shape) < abs(axis) + (axis >= 0):
        return 0
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else 0


def _constant(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None or tensor.size != 1 else float(tensor.numpy().reshape(()))


def _scale(name: str, attrs: dict, b: dict) -> float | None:
    if name == "onnx_attention":
        return attrs.get("scale") or None
    scale = 1.0
    for key, invert in (("q_scale", False), ("k_scale", False), ("post_scale", False), ("post_div", True)):
        if b.get(key) is not None:
            factor = _constant(b[key])
            if factor is None:
                return None
            scale *= 1.0 / factor if invert else factor
    return scale


def _cache_of(model: ir.Model, value: ir.Value) -> tuple[ir.Value | None, ir.Value | None]:
    """(past graph input, present graph output) when `value` = Concat(past, new) on the sequence axis."""
    producer = value.producer()
    match = producer and _CACHE_CONCAT.match(model, model.graph, producer, check_nodes_are_removable=False)
    if not match:
        return None, None
    past, axis = match.bindings["past"], producer.attributes.get_int("axis", 0)
    rank = len(value.shape) if value.shape is not None else 4
    if past not in model.graph.inputs or axis not in (rank - 2, -2) or value not in model.graph.outputs:
        return None, None
    return past, value


# ---------------------------------------------------------------- rewriting

def rewrite_sites(model: ir.Model, sites: SiteReport, plan: Plan, dtype_bytes: int) -> None:
    """Rewrite `model` in place: every site with a budget below 1 also returns its compacted K/V when it
    evicts. A plan whose KV heads keep different numbers of tokens, or whose layers keep different
    numbers (allocation='pyramid' or 'adaptive', layers left unpruned beside pruned ones), gets
    packed caches instead, each site masking by its own slots (`kvpass.rewrites.onnx_ragged`): the
    graph's one mask from `attention_mask` cannot fit layers of different lengths."""
    layers_differ = len({plan.schedule(site, dtype_bytes).token_arithmetic() for site in sites}) > 1
    if layers_differ or any(plan.head_schedule(site, dtype_bytes) is not None for site in sites):
        from kvpass.rewrites.onnx_ragged import RECENCY, rewrite_ragged_sites

        _check_rewritable(model, sites, plan.method or RECENCY)
        meta = rewrite_ragged_sites(model, sites, plan, dtype_bytes)
        model.metadata_props[METADATA_KEY] = json.dumps({"method": getattr(plan.method, "name", None),
                                                         "packed": True, "sites": meta})
        return
    _check_rewritable(model, sites, plan.method)
    graph = model.graph
    position_ids = next((v for v in graph.inputs if v.name == POSITION_INPUT), None)
    pruned = [site for site in sites if plan.schedule(site, dtype_bytes).prunes]
    if pruned and position_ids is None:
        raise UnsupportedModelError(
            f"the ONNX graph has no '{POSITION_INPUT}' input: logical positions must be explicit so RoPE stays "
            "right after eviction (export with position_ids as an input)")
    mask = next((v for v in graph.inputs if v.name == MASK_INPUT), None)
    evict = ir.Value(name=EVICT_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(pruned), 4]))
    if pruned:
        graph.inputs.append(evict)
    meta = []
    for site in sites:
        schedule = plan.schedule(site, dtype_bytes)
        entry = {"name": site.name, "layer": site.layer, "kv_heads": site.num_kv_heads, "head_dim": site.head_dim,
                 **{key: getattr(site.match, key).name for key in ("past_key", "past_value", "present_key", "present_value")},
                 "schedule": asdict(schedule), "row": None, "pattern": site.pattern}
        if schedule.prunes:
            entry["row"] = pruned.index(site)
            entry.update(_add_eviction(model, site, plan.method, mask, evict, entry["row"]))
        meta.append(entry)
    model.metadata_props[METADATA_KEY] = json.dumps({"method": plan.method.name, "sites": meta})


def _check_rewritable(model: ir.Model, sites: SiteReport, method: Method) -> None:
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"the ONNX model uses opset {opset}; kvpass rewrites opset >= {MIN_OPSET} (convert it first with "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET}))")
    inside = [s.name for s in sites if s.pattern == "ms_attention"]
    if inside:
        raise UnsupportedModelError(
            f"com.microsoft Attention nodes {inside} keep their cache inside the op, so kvpass cannot compact "
            "it; run kvpass.onnx.optimize on the unfused export, or fuse to MultiHeadAttention (onnxscript's "
            "ort_fusions) or GroupQueryAttention")
    for site in sites:
        if site.pattern == "ms_group_query_attention" and (reason := _grouped_query_refusal(site.match.anchor)):
            raise UnsupportedModelError(f"com.microsoft GroupQueryAttention node {site.name!r}: {reason}")
    for input_index, what in ((3, "a bias input"), (4, "a key_padding_mask input"), (6, "a past_key input")):
        named = [s.name for s in sites if s.pattern == "ms_multihead_attention"
                 and len(s.match.anchor.inputs) > input_index and s.match.anchor.inputs[input_index] is not None]
        if named:
            raise UnsupportedModelError(
                f"com.microsoft MultiHeadAttention nodes {named} take {what}; kvpass rewrites MultiHeadAttention "
                "over Concat(past input, new) K/V with its mask as attention_bias (what onnxscript's ort_fusions "
                "write); fuse the export that way, or prune the unfused export")
    one_way = [s.name for s in sites if s.pattern == "ms_multihead_attention"
               and s.match.anchor.attributes.get_int("unidirectional", 0)]
    if one_way and method.stat is not Stat.NONE:
        raise UnsupportedModelError(
            f"com.microsoft MultiHeadAttention nodes {one_way} have unidirectional=1: the op masks inside itself, "
            f"and kvpass's scoring of its queries does not (method {method.name!r} reads attention); fuse with the "
            "causal mask in attention_bias, or choose a method that reads none (method='paged' or 'knorm')")
    not_cached = [s.name for s in sites if not s.reads_cache]
    if not_cached:
        raise UnsupportedModelError(
            f"sites {not_cached} do not read a KV cache passed in as a graph input "
            "(Concat(past input, new) returned as a graph output), so there is no cache to prune")
    causal = [s.name for s in sites
              if s.match.probs is None and s.match.anchor.attributes.get_int("is_causal", 0)]
    if method.stat is not Stat.NONE and causal:
        raise UnsupportedModelError(
            f"Attention nodes {causal} have is_causal=1 over a Concat(past, new) cache: ONNX aligns that causal "
            "mask to the node's own past_key input (none here), so new queries would not see the cache; export "
            "with an explicit attn_mask")
    ranking_function(method, ir.DataType.FLOAT, max(opset, MIN_OPSET))  # a scoring that does not export fails here


_GQA_ATTRIBUTES = {"num_heads": None, "kv_num_heads": None, "scale": None, "do_rotary": (0,), "rotary_interleaved": None,
                   "local_window_size": (-1,), "softcap": (0.0,), "smooth_softmax": (-1, 0), "causal": (1,),
                   "qk_output": (0,)}
"""The GroupQueryAttention attributes kvpass rewrites, with the values it supports (None: any)."""


def _grouped_query_refusal(node: ir.Node) -> str | None:
    """Why kvpass cannot rewrite this GroupQueryAttention, or None. The op attends over `past ++ new`
    up to `seqlens_k` + 1 keys per row; kvpass feeds the compacted cache as past and the physical
    cache through `attention_mask`, so the lengths must be computed in the graph from it (not fed),
    and positions must not come from them: `do_rotary=1` rotates at `seqlens_k`, which after
    compaction counts kept tokens, not positions."""
    attrs = {key: attr.value for key, attr in node.attributes.items()}
    if attrs.get("do_rotary", 0):
        return ("do_rotary=1 rotates Q/K at positions taken from seqlens_k, which after compaction counts the "
                "kept tokens, not the positions; apply rotary before the op (RotaryEmbedding with position_ids) "
                "and set do_rotary=0")
    for key, value in attrs.items():
        if key not in _GQA_ATTRIBUTES:
            return f"attribute {key} is not supported (kvpass rewrites {sorted(_GQA_ATTRIBUTES)})"
        allowed = _GQA_ATTRIBUTES[key]
        if allowed is not None and value not in allowed:
            return f"attribute {key}={value} is not supported (kvpass rewrites {key} in {allowed})"
    if node.inputs[1] is None:
        return "packed QKV (no key input) is not supported; give query, key and value separately"
    extra = [index for index, value in enumerate(node.inputs) if index > 8 and value is not None]
    if extra:
        return f"inputs {extra} (position_ids, attention_bias, head_sink, quantization, ...) are not supported"
    fed = [value.name for value in node.inputs[5:7] if value.is_graph_input() or value.is_initializer()
           or value.const_value is not None or (value.producer() and value.producer().op_type == "Constant")]
    if fed:
        return (f"its lengths {fed} are fed or constant; kvpass feeds the physical cache through attention_mask, "
                "so compute seqlens_k = ReduceSum(attention_mask) - 1 and total_sequence_length from it in the graph")
    return None


class _Ops:
    """Tape helpers: integer constants and shape slices, so the subgraph reads like the torch code."""

    def __init__(self, graph: ir.Graph | None, prefix: str):
        self.tape, self.prefix, self.count = Tape(graph), prefix, 0

    def __call__(self, op_type: str, *inputs, outputs: int = 1, domain: str = "", **attributes):
        self.count += 1
        name = f"{self.prefix}/{op_type}_{self.count}"
        values = self.tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=outputs, name=name,
                                        domain=domain)
        for index, value in enumerate(values):  # named here: If branches are separate graphs, but one namespace
            value.name = f"{name}:{index}"
        return values[0] if outputs == 1 else values

    def const(self, array) -> ir.Value:
        return self("Constant", value=ir.tensor(np.asarray(array)))

    def dim(self, value: ir.Value, axis: int) -> ir.Value:
        return self("Shape", value, start=axis, end=axis + 1)

    def branch(self, name: str, build: Callable[["_Ops"], list[ir.Value]]) -> ir.Graph:
        """An `If` branch: the nodes `build` records on a fresh tape (outer values are read directly)."""
        ops = _Ops(None, f"{self.prefix}/{name}")
        outputs = build(ops)
        return ir.Graph([], outputs, nodes=ops.tape.nodes, name=f"{self.prefix}/{name}".replace("/", "_"))


def _scored_queries(method: Method) -> int | None:
    """How many of a step's last queries add to the method's statistic, as the torch kernels count them
    (`kvpass.kernels.reference.first_scored_query`); None: every query."""
    return {Stat.LAST_QUERY: 1, Stat.WINDOW: method.window, Stat.COLUMN_SUM: None}[method.stat]


def _attention_received(o: _Ops, site: AttentionSite, method: Method, cache_k: ir.Value, cache_v: ir.Value,
                        new_slots: ir.Value) -> ir.Value:
    """float32 [B, Hkv, T]: the attention each cached token received from this step's scored queries,
    summed over them and over each KV head's query group. Padding queries count nothing (the torch
    kernel lets them see only themselves, which are padding)."""
    rows = _scored_queries(method)
    probs = o("Cast", _query_probs(o, site, cache_k, cache_v, rows), to=ir.DataType.FLOAT)  # [B, Hq, rows, T]
    real = _last_rows(o, o("Slice", new_slots, o.const([0]), o.const([1]), o.const([1])), rows, axis=-1)
    real = o("Unsqueeze", o("GreaterOrEqual", real, o.const(np.int32(0))), o.const([-1]))  # [B, 1, rows, 1]
    per_query_head = o("ReduceSum", o("Where", real, probs, o.const(np.float32(0))), o.const([2]), keepdims=0)
    shape = o("Concat", o.dim(cache_k, 0), o.const([site.num_kv_heads, site.group_size, -1]), axis=0)
    return o("ReduceSum", o("Reshape", per_query_head, shape), o.const([2]), keepdims=0)


def _last_rows(o: _Ops, value: ir.Value, rows: int | None, axis: int = -2) -> ir.Value:
    """The last `rows` entries of `value` along `axis` (all of them when None, or when fewer)."""
    if rows is None:
        return value
    return o("Slice", value, o.const([-rows]), o.const([np.iinfo(np.int64).max]), o.const([axis]))


def _query_probs(o: _Ops, site: AttentionSite, cache_k: ir.Value, cache_v: ir.Value, rows: int | None) -> ir.Value:
    """The attention probabilities of the step's last `rows` queries [B, Hq, rows, T]: rows of the site's
    Softmax output, or, for a standard `Attention` node (which never materialises them), the same node
    run again on those queries with `qk_matmul_output_mode=3`: same scale, softcap, mask and precision,
    and O(rows x T) memory at a prefill of any length. GQA is the node's own (K/V unrepeated). The
    com.microsoft ops never output them: `_companion_probs` recomputes them from the op's inputs."""
    if site.match.probs is not None:
        return _last_rows(o, site.match.probs, rows)
    if site.pattern == "ms_multihead_attention":  # key [B, T, Hq x D], mask in attention_bias
        anchor = site.match.anchor
        keys = o("Transpose", o("Reshape", anchor.inputs[1], o.const([0, 0, site.num_heads, site.head_dim])),
                 perm=[0, 2, 1, 3])
        bias = anchor.inputs[5] if len(anchor.inputs) > 5 else None
        return _companion_probs(o, site, keys, rows, bias=bias)
    if site.pattern == "ms_group_query_attention":  # keys: the op's present [B, Hkv, T, D]; causal inside
        return _companion_probs(o, site, cache_k, rows, causal=True)
    anchor = site.match.anchor
    q, _, _, *rest = anchor.inputs
    mask = rest[0] if rest else None
    if mask is not None and (mask.shape is None or len(mask.shape) >= 2):
        mask = _last_rows(o, mask, rows)
    attributes = {name: attr.value for name, attr in anchor.attributes.items()}
    outputs = o("Attention", _last_rows(o, q, rows), cache_k, cache_v, mask, *rest[1:], outputs=4,
                **{**attributes, "qk_matmul_output_mode": 3})
    for unused in outputs[1:3]:  # present K/V: not asked for
        unused.name = ""
    return outputs[3]


def _companion_probs(o: _Ops, site: AttentionSite, keys: ir.Value, rows: int | None, bias: ir.Value | None = None,
                     causal: bool = False) -> ir.Value:
    """softmax(Q K^T x scale + bias, causal) of the last `rows` queries [B, Hq, rows, T], in float32.

    A com.microsoft fused op keeps its probabilities inside, so this companion recomputes them from
    the op's own query [B, S, Hq x D] and `keys` [B, Hk, T, D] (Hk divides Hq: each group of Hq / Hk
    query heads reads one key head), O(rows x T) at any prefill; the op still computes the layer's
    output. `causal`: query i of the step's S sees keys up to T - S + i (the step's tokens are last)."""
    query, keys = (o("Cast", value, to=ir.DataType.FLOAT) for value in (site.match.anchor.inputs[0], keys))
    query = o("Reshape", _last_rows(o, query, rows, axis=1), o.const([0, 0, site.num_heads, site.head_dim]))
    key_heads = o.dim(keys, 1)
    grouped = o("Reshape", o("Transpose", query, perm=[0, 2, 1, 3]),
                o("Concat", o.const([0]), key_heads, o.const([-1, site.head_dim]), axis=0))  # [B, Hk, g x rows, D]
    scale = site.scale if site.scale is not None else site.head_dim**-0.5
    logits = o("Mul", o("MatMul", grouped, o("Transpose", keys, perm=[0, 1, 3, 2])), o.const(np.float32(scale)))
    logits = o("Reshape", logits, o.const([0, site.num_heads, -1, 0]))  # [B, Hq, rows, T]
    if bias is not None:
        logits = o("Add", logits, o("Cast", _last_rows(o, bias, rows), to=ir.DataType.FLOAT))
    if causal:
        length, scored = (o("Squeeze", o.dim(logits, axis), o.const([0])) for axis in (3, 2))
        one = o.const(np.int64(1))
        last_seen = o("Range", o("Sub", length, scored), length, one)  # the last key each scored query sees
        key_index = o("Range", o.const(np.int64(0)), length, one)
        visible = o("LessOrEqual", o("Unsqueeze", key_index, o.const([0])), o("Unsqueeze", last_seen, o.const([1])))
        logits = o("Where", visible, logits, o.const(np.float32(-np.inf)))
    return o("Softmax", logits, axis=-1)


def _add_eviction(model: ir.Model, site: AttentionSite, method: Method, mask: ir.Value | None,
                  evict: ir.Value, row: int) -> dict[str, str]:
    """Append one site's slots (and carried statistic) and its evict-or-append `If`; returns the names
    of the state inputs and outputs it added (`evicted_key`, `evicted_value`, `past_slots`, `present_slots`,
    `past_stat`, `present_stat`).

    `present` K/V stay the uncompacted cache (past + new). When the step evicts, the compacted cache
    is `kvpass_evicted_{key,value}_i`; when it only appends, those are empty and `present` is the cache."""
    graph, x = model.graph, site.match
    o = _Ops(graph, f"kvpass/{site.layer}")
    cache_k, cache_v = x.present_key, x.present_value
    batch = x.past_key.shape[0] if x.past_key.shape else None

    def state_input(name: str, dtype: ir.DataType) -> ir.Value:
        value = ir.Value(name=f"kvpass_past_{name}_{site.layer}", type=ir.TensorType(dtype),
                         shape=ir.Shape([batch, site.num_kv_heads, f"past_{site.layer}"]))
        graph.inputs.append(value)
        return value

    params = o("Gather", evict, o.const(row), axis=0)
    new = o("Squeeze", o("Sub", o.dim(cache_k, 2), o.dim(x.past_key, 2)), o.const([0]))
    new_slots = step_slots(o, site, o("Gather", params, o.const(3), axis=0), new, mask)
    state = [cache_k, cache_v, o("Concat", state_input("slots", ir.DataType.INT32), new_slots, axis=2)]
    if method.stat.carried:  # summed over every step, evicting or not: state the graph carries
        new = o("Sub", o.dim(cache_k, 2), o.dim(x.past_key, 2))
        zeros = o("ConstantOfShape", o("Concat", o.dim(cache_k, 0), o.const([site.num_kv_heads]), new, axis=0))
        grown = o("Concat", state_input("stat", ir.DataType.FLOAT), zeros, axis=2)
        state.append(o("Add", grown, _attention_received(o, site, method, cache_k, cache_v, new_slots)))

    keep = o("Gather", params, o.const([0]), axis=0)  # [1], as TopK wants k
    evicting = o("Less", keep, o.dim(cache_k, 2))  # the host feeds keep = length when no eviction is due
    ranking = ranking_function(method, cache_k.dtype, model.opset_imports[""])
    model.functions[ranking.identifier()] = ranking
    model.opset_imports[ranking.domain] = 1
    evicted = o.branch("evict", lambda b: _select_and_compact(b, site, method, ranking, state, new_slots, keep, params))
    # Between evictions the cache is the `present` Concat itself: passing it through the If would copy
    # it every step (an outer value with other readers), so K/V leave the append branch empty.
    appended = o.branch("append", lambda b: [*(_empty_tokens(b, value) for value in state[:2]),
                                             *(b("Identity", value) for value in state[2:])])
    outputs = o("If", evicting, outputs=len(state), then_branch=evicted, else_branch=appended)

    names = {}
    for kind, full, value in zip(("key", "value"), (cache_k, cache_v), outputs[:2]):
        value.name, value.dtype = f"kvpass_evicted_{kind}_{site.layer}", full.dtype
        value.shape = ir.Shape([batch, site.num_kv_heads, f"kept_{site.layer}", site.head_dim])
        graph.outputs.append(value)
        names[f"evicted_{kind}"] = value.name
    for kind, value, dtype in zip(("slots", "stat"), outputs[2:], (ir.DataType.INT32, ir.DataType.FLOAT)):
        value.name, value.dtype = f"kvpass_present_{kind}_{site.layer}", dtype
        value.shape = ir.Shape([batch, site.num_kv_heads, f"cache_{site.layer}"])  # kept, or past + new
        graph.outputs.append(value)
        names[f"past_{kind}"], names[f"present_{kind}"] = f"kvpass_past_{kind}_{site.layer}", value.name
    return names


def _empty_tokens(o: _Ops, cache: ir.Value) -> ir.Value:
    """`cache` [B, H, T, D] with no tokens [B, H, 0, D]: what an If branch returns for a cache it leaves alone."""
    return o("Slice", cache, o.const([0]), o.const([0]), o.const([2]))


def step_slots(o: _Ops, site: AttentionSite, seen: ir.Value, new: ir.Value, mask: ir.Value | None) -> ir.Value:
    """int32 [B, Hkv, L]: the new tokens' slots, their places in the sequence (`seen - L` .. `seen - 1`),
    -1 - slot for padding (the last L columns of `mask` are 0), as the torch runtime labels them.
    Not the position ids: a left-padded row's positions start after its padding, its slots do not.
    `seen`, `new`: int64 scalars, tokens seen after this step and the step's L."""
    cache = site.match.present_key
    slots = o("Unsqueeze", o("Range", o("Sub", seen, new), seen, o.const(np.int64(1))), o.const([0]))  # [1, L]
    if mask is not None:
        new_columns = o("Slice", mask, o("Unsqueeze", o("Neg", new), o.const([0])),
                        o.const([np.iinfo(np.int64).max]), o.const([1]))
        padding = o("Not", o("Cast", new_columns, to=ir.DataType.BOOL))
        slots = o("Where", padding, o("Sub", o.const(np.int64(-1)), slots), slots)
    slots = o("Unsqueeze", o("Cast", slots, to=ir.DataType.INT32), o.const([1]))
    return o("Expand", slots, o("Concat", o.dim(cache, 0), o.const([site.num_kv_heads, 1]), axis=0))


def _select_and_compact(o: _Ops, site: AttentionSite, method: Method, ranking: ir.Function, state: list[ir.Value],
                        new_slots: ir.Value, keep: ir.Value, params: ir.Value) -> list[ir.Value]:
    """rank (the torch ranking, exported: `kvpass.rewrites.onnx_scoring`) → top `keep` → gather: the
    compacted `state` (keys, values, slots and the carried statistic, if any)."""
    cache_k, cache_v, slots = state[:3]
    sinks, recent, seen = (o("Cast", o("Gather", params, o.const(i), axis=0), to=ir.DataType.INT32) for i in (1, 2, 3))
    if method.stat.carried:
        stat = state[3]
    elif method.stat is not Stat.NONE:
        stat = _attention_received(o, site, method, cache_k, cache_v, new_slots)
    else:
        stat = o("Cast", slots, to=ir.DataType.FLOAT)  # no statistic: any [B, Hkv, T] float fills the input
    scores = o(ranking.name, cache_k, cache_v, slots, stat, seen, sinks, recent, domain=ranking.domain)
    _, top = o("TopK", scores, keep, axis=-1, largest=1, sorted=1, outputs=2)  # ties: earlier token first
    index, _ = o("TopK", top, keep, axis=-1, largest=0, sorted=1, outputs=2)  # kept indices, slot order
    rows = _row_index(o, cache_k, index)
    compacted = [_gather_rows(o, cache_k, rows), _gather_rows(o, cache_v, rows),
                 *(o("GatherElements", per_token, index, axis=2) for per_token in state[2:])]
    for value, dtype in zip(compacted, (cache_k.dtype, cache_v.dtype, ir.DataType.INT32, ir.DataType.FLOAT)):
        value.dtype = dtype  # If branch outputs must be typed
    return compacted


def _row_index(o: _Ops, cache: ir.Value, index: ir.Value) -> ir.Value:
    """Token `index` [B, H, k] as rows of `cache` [B, H, T, D] flattened to [B*H*T, D]: a Gather of
    whole rows copies D values at a time, where GatherElements on an expanded index goes one by one."""
    batch_heads = o("Squeeze", o("Mul", o.dim(cache, 0), o.dim(cache, 1)), o.const([0]))
    first = o("Mul", o("Range", o.const(np.int64(0)), batch_heads, o.const(np.int64(1))), o.dim(cache, 2))
    return o("Add", index, o("Reshape", first, o("Concat", o("Shape", index, end=2), o.const([1]), axis=0)))


def _gather_rows(o: _Ops, cache: ir.Value, rows: ir.Value) -> ir.Value:
    return o("Gather", o("Reshape", cache, o("Concat", o.const([-1]), o.dim(cache, 3), axis=0)), rows, axis=0)
