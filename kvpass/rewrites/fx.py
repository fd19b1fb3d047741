"""Find attention in an FX graph of ATen ops, and rewrite cached attention onto a replacement op.

Matching is driven by the op tables below, not by per-model code. Two anchors start a match:

* an SDPA op (`scaled_dot_product_attention` and its fused variants): q, k, v, mask and flags are
  read from the op's own arguments;
* a softmax: its input is walked up to a score product `q @ kᵀ` (matmul, bmm, einsum, baddbmm)
  through *transparent* ops (layout and dtype moves), *scale* ops (mul/div by a constant) and *mask*
  ops (add, masked_fill, where), and its output is walked down to the `probs @ v` product.

From the q, k, v operands the walk continues up through transparent and *repeat* ops (GQA/MQA
expand or repeat_interleave) to the projections, which give the geometry (heads, KV heads, head
dim), self vs cross, whether K/V are concatenated onto a past cache read from the graph inputs, and
the module that owns the site. A softmax over a product of two activations that fails any later
step is reported in `SiteReport.unsupported` with the reason.

Causality is decided from the graph, never from the model's class: an SDPA `is_causal=True`, or a
mask whose producers contain `tril`/`triu`, an ordering comparison (`<`, `<=`, `>`, `>=`) between two
tensors (how HF builds masks from position indices), or a constant buffer that is triangular.
"""

from __future__ import annotations

import math
import operator
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.fx import GraphModule, Node

from kvpass.anchors import Projection, Projections
from kvpass.site import AttentionSite, SiteReport, UnsupportedAttention

aten = torch.ops.aten

# --- the pattern vocabulary -------------------------------------------------------------------

TRANSPARENT_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.t.default, aten.clone.default, aten.contiguous.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.flatten.using_ints, aten.unflatten.int, aten._to_copy.default, aten.to.dtype,
    aten.to.dtype_layout, aten.to.device, aten.type_as.default, aten.dropout.default,
    aten.alias.default, aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default,
})
"""Ops that move, relabel or cast data without mixing values: walked through in every direction."""

REPEAT_OPS = frozenset({aten.expand.default, aten.repeat_interleave.self_int, aten.repeat.default})
"""Ops that replicate K/V heads for GQA/MQA (or broadcast in decomposed matmuls)."""

ROUTING_OPS = frozenset({aten.index.Tensor, aten.index_select.default, aten.gather.default,
                         aten.split_with_sizes.default, aten.split.Tensor, operator.getitem})
"""Ops a routed query path (mixture-of-attention experts) reads the hidden states through: each expert
gathers its tokens, and the expert outputs are split apart."""

SOFTMAX_OPS = frozenset({aten._softmax.default, aten.softmax.int, aten._safe_softmax.default})


@dataclass(frozen=True)
class ArgRule:
    """Which schema arguments of an op play which role (names as in the ATen schema)."""

    q: str = ""
    k: str = ""
    v: str = ""
    mask: str = ""
    scale: str = ""
    causal: str = ""


SDPA_OPS: dict[Any, ArgRule] = {
    aten.scaled_dot_product_attention.default: ArgRule(
        "query", "key", "value", mask="attn_mask", scale="scale", causal="is_causal"),
    aten._scaled_dot_product_attention_math.default: ArgRule(
        "query", "key", "value", mask="attn_mask", scale="scale", causal="is_causal"),
    aten._scaled_dot_product_flash_attention.default: ArgRule(
        "query", "key", "value", scale="scale", causal="is_causal"),
    aten._scaled_dot_product_flash_attention_for_cpu.default: ArgRule(
        "query", "key", "value", mask="attn_mask", scale="scale", causal="is_causal"),
    aten._scaled_dot_product_efficient_attention.default: ArgRule(
        "query", "key", "value", mask="attn_bias", scale="scale", causal="is_causal"),
    aten._scaled_dot_product_cudnn_attention.default: ArgRule(
        "query", "key", "value", mask="attn_bias", scale="scale", causal="is_causal"),
}
"""Fused attention ops and where their operands are; fused variants return a tuple (output first)."""

SCORE_OPS: dict[Any, ArgRule] = {
    aten.matmul.default: ArgRule(q="self", k="other"),
    aten.bmm.default: ArgRule(q="self", k="mat2"),
    aten.baddbmm.default: ArgRule(q="batch1", k="batch2", mask="self", scale="alpha"),
    aten.einsum.default: ArgRule(),  # operands come from the equation, see `_einsum_roles`
}
"""Producers of the score matrix q·kᵀ (also used, with probs as q, to find the probs·v product)."""

SCALE_OPS = {aten.mul.Tensor: False, aten.mul.Scalar: False, aten.div.Tensor: True, aten.div.Scalar: True,
             aten.mul_.Tensor: False, aten.mul_.Scalar: False, aten.div_.Tensor: True, aten.div_.Scalar: True}
"""Multiplications by a constant (in place too: `scores /= sqrt(d)`); the flag says the constant divides."""

MASK_OPS: dict[Any, tuple[str, ...]] = {
    aten.add.Tensor: ("self", "other"),
    aten.add_.Tensor: ("self",),
    aten.sub.Tensor: ("self",),
    aten.masked_fill.Scalar: ("self",),
    aten.masked_fill.Tensor: ("self",),
    aten.masked_fill_.Scalar: ("self",),
    aten.masked_fill_.Tensor: ("self",),
    aten.where.self: ("self",),
    aten.where.ScalarOther: ("self",),
    aten.mul.Tensor: ("self", "other"),
}
"""Ops that combine scores with a mask or bias; the names list the arguments that may carry scores.
Multiplying by a tensor (not a constant: those are scale ops) is a multiplicative mask `w·b + c·(1-b)`
or a per-head scale; the site records it as a "tensor_factor" logit op."""

TENSOR_FACTOR_OPS = frozenset({aten.mul.Tensor})

LOGIT_OPS: dict[Any, str] = {
    aten.tanh.default: "softcap",
    aten.maximum.default: "clamp",
    aten.max.other: "clamp",
    aten.clamp.default: "clamp",
    aten.clamp_min.default: "clamp",
}
"""Element-wise ops on the logits a site may carry: soft-capping `cap·tanh(x/cap)` and a clamp from below
(`max(scores, finfo.min)`, an older way to mask). Each is named in `AttentionSite.logit_ops`."""

SINK_OPS = frozenset({aten.cat.default})
"""Concatenating learned sink logits as extra key columns (GPT-OSS), dropped again after the softmax."""

STABILIZER_OPS = frozenset({aten.amax.default, aten.max.dim})
"""The row maximum subtracted from the logits before a softmax (no effect on its result)."""

ZEROING_OPS = frozenset({aten.masked_fill.Scalar, aten.masked_fill_.Scalar, aten.masked_fill.Tensor})
"""Zeroing the probabilities of fully masked rows after the softmax (they attend to nothing)."""

PROJECTION_OPS = {aten.linear.default: "input", aten.addmm.default: "mat1", aten.mm.default: "self"}
"""Projections from hidden states; the name is the activation argument (the other is a weight)."""

CAUSAL_OPS = frozenset({aten.tril.default, aten.triu.default})
ORDER_COMPARISONS = frozenset({aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor})
SCALAR_ORDER_COMPARISONS = frozenset({aten.lt.Scalar, aten.le.Scalar, aten.gt.Scalar, aten.ge.Scalar})
"""`distance >= 0` with distance = query positions - key positions (a difference of two index ranges),
when the result selects or blocks logits (not when it is arithmetic, as in T5's relative-position buckets)."""
MASK_CONSUMERS = frozenset({aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar,
                            aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.logical_and.default,
                            aten.bitwise_and.Tensor, aten.bitwise_not.default})
CACHE_INDEX_OPS = frozenset({aten.select.int, aten.slice.Tensor, operator.getitem})
"""Ops that pick one layer's past K/V out of a stacked cache input."""
SIZE_OPS = frozenset({aten.sym_size.int})
"""Reading a tensor's (free) size: the size is data, the tensor's values are not."""

MASK_CONE_LIMIT = 400
"""How many producer nodes of a mask are inspected to decide causality."""


# --- small graph helpers ----------------------------------------------------------------------

def _is_call(node: Any, ops: Iterable) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in ops


def _arguments(node: Node) -> dict[str, Any]:
    """The node's arguments by ATen schema name (so rules can say 'key' instead of 'args[1]')."""
    named = {}
    for index, argument in enumerate(node.target._schema.arguments):
        if index < len(node.args):
            named[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            named[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            named[argument.name] = argument.default_value
    return named


def _val(node: Any) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _shape(node: Any) -> tuple[int, ...]:
    """Static sizes; -1 for a size only known at run time (data-dependent, e.g. tokens routed to an expert)."""
    value = _val(node)
    return tuple(_size(s) for s in value.shape) if value is not None else ()


def _size(size: Any) -> int:
    try:
        return int(size)
    except Exception:  # noqa: BLE001 - an unbacked symbolic size has no value to give
        return -1


def _numel(node: Node) -> int:
    return math.prod(_shape(node))


def _walk_up(node: Node, through: frozenset) -> tuple[Node, list[Node]]:
    """Follow the data input (first argument) up through `through` ops and whole-axis slices (`x[:, :, None]`
    records one); return the top and the path."""
    path = []
    while (_is_call(node, through) or _whole_slice(node)) and isinstance(node.args[0], Node):
        path.append(node)
        node = node.args[0]
    return node, path


def _whole_slice(node: Node) -> bool:
    """A slice that keeps its whole axis (start 0, to the end, step 1): a relabelling, like a view."""
    if not _is_call(node, {aten.slice.Tensor}) or not isinstance(node.args[0], Node):
        return False
    args = _arguments(node)
    shape = _shape(node.args[0])
    dim = args.get("dim", 0)
    end = args.get("end")
    return (args.get("start") in (None, 0) and args.get("step", 1) == 1 and bool(shape)
            and (end is None or (isinstance(end, int) and end >= shape[dim])))


def _constant(arg: Any) -> float | None:
    """The value of a scalar constant: a literal, `full`/`scalar_tensor`, a one-element buffer, a sqrt."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if not isinstance(arg, Node):
        return None
    if arg.op == "get_attr":
        value = _attribute(arg)
        return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else None
    if _is_call(arg, TRANSPARENT_OPS | REPEAT_OPS):
        return _constant(arg.args[0])
    if _is_call(arg, {aten.full.default, aten.full_like.default}):
        return _constant(arg.args[1])
    if _is_call(arg, {aten.scalar_tensor.default}):
        return _constant(arg.args[0])
    if _is_call(arg, {aten.sqrt.default}):
        inner = _constant(arg.args[0])
        return math.sqrt(inner) if inner is not None and inner >= 0 else None
    return None


def _attribute(node: Node) -> Any:
    value: Any = node.graph.owning_module
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value


def _peel_scale(node: Node) -> tuple[Node, float] | None:
    """If `node` multiplies or divides a tensor by a constant, return (tensor, factor)."""
    if not _is_call(node, SCALE_OPS) or len(node.args) < 2:
        return None
    divides = SCALE_OPS[node.target]
    left, right = node.args[0], node.args[1]
    for data, const in ((left, right), (right, left)) if not divides else ((left, right),):
        value = _constant(const)
        if value is not None and isinstance(data, Node) and _val(data) is not None and value != 0:
            return data, (1.0 / value if divides else value)
    return None


def _walk_up_scaled(node: Node) -> tuple[Node, float]:
    """Walk up through transparent and constant-scale ops, multiplying the scale factors found."""
    factor = 1.0
    while True:
        if _is_call(node, TRANSPARENT_OPS):
            node = node.args[0]
            continue
        peeled = _peel_scale(node)
        if peeled is None:
            return node, factor
        node, factor = peeled[0], factor * peeled[1]


def _is_weight(node: Node) -> bool:
    top, _ = _walk_up(node, TRANSPARENT_OPS | REPEAT_OPS)
    return top.op == "get_attr"


def _module_path(raw: str) -> str:
    """Normalise an `nn_module_stack` path (export or dynamo spelling) to a `named_modules()` key."""
    path = re.sub(r"^(L\['self'\]|L__self__|self(?=[.\[]|$))", "", raw)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    return path.strip(".")


def module_stack(node: Node) -> list[str]:
    """The `named_modules()` paths of the modules that were running when `node` was traced, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [_module_path(entry[0]) for entry in stack.values()]


def _owning_module(nodes: list[Node]) -> str:
    """The deepest module whose stack contains all `nodes` (e.g. q projection and attention op)."""
    stacks = [module_stack(n) for n in nodes if n.meta.get("nn_module_stack")]
    if not stacks:
        return ""
    common = ""
    for depth in range(min(len(s) for s in stacks)):
        paths = {s[depth] for s in stacks}
        if len(paths) != 1:
            break
        common = paths.pop()
    return common


# --- per-site analysis ------------------------------------------------------------------------

@dataclass
class _Core:
    """What a pattern extracted from the attention op(s) before geometry is worked out."""

    pattern: str
    anchor: Node
    q: Node
    k: Node
    v: Node
    out: Node
    num_heads: int
    head_dim: int
    heads_of_k: int
    """Head count of the k operand as the attention op sees it (after any repeat)."""
    scale: float
    causal_flag: bool = False
    masks: list[Node] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    weights_used: bool = False
    logit_ops: list[str] = field(default_factory=list)


class _Miss(Exception):
    """An attention-like subgraph that no rule fits; the message is the reason reported."""


def _match_sdpa(node: Node) -> _Core:
    rule = SDPA_OPS[node.target]
    args = _arguments(node)
    q, k, v = args[rule.q], args[rule.k], args[rule.v]
    q_shape, k_shape = _shape(q), _shape(k)
    if len(q_shape) != 4 or len(k_shape) != 4:
        raise _Miss(f"SDPA with {len(q_shape)}-d query; expected [batch, heads, seq, head_dim]")
    out = node
    if isinstance(node.meta.get("val"), (tuple, list)):
        outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if not outs:
            raise _Miss("fused attention output is never read")
        out = outs[0]
    head_dim = q_shape[-1]
    scale = args.get(rule.scale) if rule.scale else None
    mask = args.get(rule.mask) if rule.mask else None
    return _Core(
        pattern="sdpa", anchor=node, q=q, k=k, v=v, out=out, num_heads=q_shape[-3], head_dim=head_dim,
        heads_of_k=k_shape[-3], scale=float(scale) if scale is not None else 1.0 / math.sqrt(head_dim),
        causal_flag=bool(args.get(rule.causal, False)), masks=[mask] if isinstance(mask, Node) else [],
        nodes=[node] + ([out] if out is not node else []),
    )


@dataclass
class _ScorePath:
    """What lies between the score product and the softmax."""

    producer: Node
    scale: float = 1.0
    masks: list[Node] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    logit_ops: list[str] = field(default_factory=list)
    """Names of `LOGIT_OPS` found on the way (soft-capping, sink logits, ...)."""


def _is_stabilizer(node: Node, scores: Node) -> bool:
    """`node` is the row maximum of `scores` (subtracted before a softmax for stability)."""
    top, _ = _walk_up(node, TRANSPARENT_OPS | {operator.getitem})
    return _is_call(top, STABILIZER_OPS) and _walk_up(top.args[0], TRANSPARENT_OPS)[0] is scores


def _find_scores(node: Node) -> _ScorePath | None:
    """Walk from the softmax input up to the q·kᵀ product, collecting scale factors, masks and logit ops."""
    path: list[Node] = []
    scale = 1.0
    while True:
        if _is_call(node, SCORE_OPS):
            return _ScorePath(node, scale, [], path)
        if _is_call(node, TRANSPARENT_OPS):
            path.append(node)
            node = node.args[0]
            continue
        peeled = _peel_scale(node)
        if peeled is not None:
            path.append(node)
            node, scale = peeled[0], scale * peeled[1]
            continue
        if _is_call(node, LOGIT_OPS) and _logit_op_fits(node):
            # soft-capping cap·tanh(x/cap): the factors on both sides multiply into the pre-cap scale
            below = _find_scores(node.args[0])
            if below is not None:
                below.scale *= scale
                below.nodes += path + [node]
                below.logit_ops.append(LOGIT_OPS[node.target])
            return below
        if _is_call(node, SINK_OPS):
            return _through_sink_column(node, scale, path)
        if not _is_call(node, MASK_OPS):
            return None
        args = _arguments(node)
        for name in MASK_OPS[node.target]:
            below = _find_scores(args[name]) if isinstance(args.get(name), Node) else None
            if below is not None:
                others = [a for n, a in args.items() if n != name and isinstance(a, Node)
                          and not _is_stabilizer(a, args[name])]
                below.scale *= scale
                below.masks += others
                below.nodes += path + [node]
                if node.target in TENSOR_FACTOR_OPS and others:
                    below.logit_ops.append("tensor_factor")
                return below
        return None


def _logit_op_fits(node: Node) -> bool:
    """A clamp must only bound from below by a constant (masking to the dtype minimum); tanh always fits."""
    if node.target is aten.tanh.default:
        return True
    args = _arguments(node)
    bound = args.get("other", args.get("min"))
    return args.get("max") is None and _constant(bound) is not None


def _through_sink_column(cat: Node, scale: float, path: list[Node]) -> _ScorePath | None:
    """cat([scores, sinks], key axis): learned sink logits that take part in the softmax's denominator."""
    tensors, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    rank = len(_shape(cat))
    if len(tensors) != 2 or not rank or dim % rank != rank - 1:
        return None
    below = _find_scores(tensors[0]) if isinstance(tensors[0], Node) else None
    if below is None or _find_scores(tensors[1]) is not None:
        return None
    below.scale *= scale
    below.nodes += path + [cat]
    below.logit_ops.append("sinks")
    return below


def _score_product_above(softmax: Node, limit: int = 48) -> Node | None:
    """A product of two activations within `limit` producers of the softmax input (attention-like);
    logits are computed from q and k, never through another projection."""
    def is_score_product(node: Node) -> bool:
        if node is softmax or not _is_call(node, SCORE_OPS) or len(_shape(node)) < 3:
            return False
        operands = node.args[1] if node.target is aten.einsum.default else [
            _arguments(node)[SCORE_OPS[node.target].q], _arguments(node)[SCORE_OPS[node.target].k]]
        return len(operands) == 2 and not any(_is_weight(o) for o in operands)

    return _nearest_above(softmax, is_score_product, limit, through=lambda n: not _is_call(n, PROJECTION_OPS))


def _einsum_roles(node: Node) -> tuple[Node, Node, int, int, int]:
    """(q, k, num_heads, head_dim, heads_of_k) of a two-operand score einsum such as 'bhqd,bhkd->bhqk'."""
    equation, operands = node.args[0], node.args[1]
    if len(operands) != 2 or "->" not in equation or "." in equation:
        raise _Miss(f"einsum '{equation}' is not a two-operand explicit score product")
    inputs, out = equation.replace(" ", "").split("->")
    q_sub, k_sub = inputs.split(",")
    q, k = operands
    sizes = dict(zip(q_sub, _shape(q)))
    contracted = [c for c in q_sub if c in k_sub and c not in out]
    if len(out) != 4 or not contracted:
        raise _Miss(f"einsum '{equation}' does not give [batch, heads, q, k] scores")
    head = out[-3]
    heads_of_k = dict(zip(k_sub, _shape(k))).get(head, 1)
    return q, k, sizes[head], math.prod(sizes[c] for c in contracted), heads_of_k


def _heads_of_folded(q: Node, head_dim: int) -> int:
    """Heads when they are folded into the batch (q is [B·H, L, D]): read off the layout q was reshaped
    from on the way up: [B, H, L, D], [B, L, H, D], or the same data unsplit, [..., H·D]. Never from a
    wider tensor (a fused QKV projection triples the width)."""
    folded, length = _shape(q)[0], _shape(q)[-2]
    node = q
    while isinstance(node, Node):
        shape = _shape(node)
        if len(shape) == 4 and shape[-1] == head_dim:
            if shape[0] * shape[1] == folded and shape[2] == length:
                return shape[1]
            if shape[0] * shape[2] == folded and shape[1] == length:
                return shape[2]
        if (shape and shape[-1] > head_dim and shape[-1] % head_dim == 0 and length in shape[:-1]
                and math.prod(shape) == folded * length * head_dim):
            return shape[-1] // head_dim
        if not (_is_call(node, TRANSPARENT_OPS | SCALE_OPS.keys() | CACHE_INDEX_OPS | {aten.unbind.int})
                and node.args and isinstance(node.args[0], Node)):
            break
        node = node.args[0]
    raise _Miss(f"heads are folded into the batch dimension ({folded}) and no [batch, heads, seq, head_dim] "
                "layout above the query shows the head count")


def _probs_times_v(softmax: Node, sinks: bool) -> tuple[Node, Node, list[Node], bool]:
    """Find `probs @ v` below the softmax: (product, v, path, whether probs are also used elsewhere).
    With `sinks`, the sink columns are sliced off the key axis on the way."""
    frontier, path, products, elsewhere = [softmax], [], [], False
    rank = len(_shape(softmax))
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.target is aten._assert_tensor_metadata.default:
                continue
            key_slice = sinks and _is_call(user, {aten.slice.Tensor}) and _arguments(user)["dim"] % rank == rank - 1
            zeroing = _is_call(user, ZEROING_OPS) and _constant(_arguments(user).get("value")) == 0.0
            if (_is_call(user, TRANSPARENT_OPS) or key_slice or zeroing) and user.args[0] is node:
                path.append(user)
                frontier.append(user)
            elif _is_call(user, SCORE_OPS) and _first_operand(user) is node:
                products.append(user)
            else:
                elsewhere = True
    if len(products) != 1:
        if not products and _combined_softmaxes(softmax):
            raise _Miss("differential attention: this softmax is combined with another one before the values "
                        "are multiplied (two attentions per layer)")
        raise _Miss("softmax output is not multiplied by values with a matmul" if not products
                    else "softmax output feeds several value products")
    product = products[0]
    v = product.args[1][1] if product.target is aten.einsum.default else _arguments(product)[SCORE_OPS[product.target].k]
    return product, v, path, elsewhere


def _combined_softmaxes(softmax: Node, limit: int = 24) -> bool:
    """The softmax's output meets another softmax's in element-wise ops before a value product."""
    seen, queue = {softmax}, deque([softmax])
    while queue and len(seen) < limit:
        node = queue.popleft()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if _is_call(user, SCORE_OPS):
                others = _ancestors(_first_operand(user), limit=64) if isinstance(_first_operand(user), Node) else set()
                return any(_is_call(n, SOFTMAX_OPS) and n is not softmax for n in others)
            if user.op == "call_function":
                queue.append(user)
    return False


def _first_operand(node: Node) -> Any:
    if node.target is aten.einsum.default:
        return node.args[1][0] if len(node.args[1]) == 2 else None
    return _arguments(node)[SCORE_OPS[node.target].q]


def _match_softmax_chain(softmax: Node) -> _Core | None:
    """Returns None when the softmax is not attention-like (no product of two activations above it)."""
    scores = _find_scores(softmax.args[0])
    if scores is None:
        product = _score_product_above(softmax)
        if product is None:
            return None
        above = _ancestors(softmax.args[0])
        between, frontier = set(), [product]
        while frontier:
            for user in frontier.pop().users:
                if user in above and user not in between:
                    between.add(user)
                    frontier.append(user)
        names = sorted({getattr(n.target, "_opname", getattr(n.target, "__name__", str(n.target))) for n in between
                        if n.target not in TRANSPARENT_OPS})
        raise _Miss(f"softmax over q·kᵀ through ops kvpass does not model: {', '.join(names)}")
    producer = scores.producer
    if producer.target is aten.einsum.default:
        if len(producer.args[1]) != 2 or any(_is_weight(t) for t in producer.args[1]):
            return None
        q, k, num_heads, head_dim, heads_of_k = _einsum_roles(producer)
    else:
        rule = SCORE_OPS[producer.target]
        args = _arguments(producer)
        q, k = args[rule.q], args[rule.k]
        if _is_weight(q) or _is_weight(k):
            return None
        head_dim = _shape(q)[-1]
        score_shape = _shape(producer)
        num_heads = score_shape[-3] if len(score_shape) == 4 else _heads_of_folded(q, head_dim)
        heads_of_k = _shape(k)[-3] if len(_shape(k)) == 4 else num_heads
        if rule.mask and isinstance(args.get(rule.mask), Node):
            scores.masks.append(args[rule.mask])
        if rule.scale:
            scores.scale *= float(args.get(rule.scale, 1.0))
    dim = softmax.args[1] if len(softmax.args) > 1 else -1
    if dim % len(_shape(softmax)) != len(_shape(softmax)) - 1:
        raise _Miss(f"softmax over dim {dim}, not over the key axis")
    product, v, down, elsewhere = _probs_times_v(softmax, sinks="sinks" in scores.logit_ops)
    return _Core(
        pattern="eager_softmax_chain", anchor=softmax, q=q, k=k, v=v, out=product, num_heads=num_heads,
        head_dim=head_dim, heads_of_k=heads_of_k, scale=scores.scale, masks=scores.masks,
        nodes=[producer, *scores.nodes, softmax, *down, product], weights_used=elsewhere,
        logit_ops=sorted(set(scores.logit_ops)),
    )


def _projection(node: Node, limit: int = 64) -> Node | None:
    """The nearest projection (linear/addmm/mm with a weight) at or above `node`, breadth first."""
    return _nearest_above(node, lambda n: _is_call(n, PROJECTION_OPS), limit)


def _nearest_above(node: Node, wanted: Callable[[Node], bool], limit: int,
                   through: Callable[[Node], bool] = lambda n: True) -> Node | None:
    """The first of `node` and its producers (breadth first, at most `limit`) that `wanted` accepts,
    walking past only the nodes `through` accepts."""
    seen, queue = {node}, deque([node])
    while queue and len(seen) < limit:
        current = queue.popleft()
        if wanted(current):
            return current
        if not through(current):
            continue
        for arg in current.all_input_nodes:
            if arg not in seen and arg.op == "call_function":
                seen.add(arg)
                queue.append(arg)
    return None


def _projection_source(projection: Node) -> Node:
    activation = _arguments(projection)[PROJECTION_OPS[projection.target]]
    return _walk_up(activation, TRANSPARENT_OPS)[0]


def _sources(projection: Node, hops: int = 2) -> list[Node]:
    """The activation a projection reads, then the one read by the projection feeding it (through a
    norm or a split), up to `hops`: a low-rank path (latent K/V, a LoRA-style query) passes through
    two projections on its way from the hidden states."""
    chain: list[Node] = []
    while projection is not None and len(chain) < hops:
        chain.append(_projection_source(projection))
        projection = _projection(chain[-1], limit=16)
    return chain


def _mask_is_causal(masks: list[Node]) -> bool:
    """True if a mask's producers contain tril/triu, an order comparison of two tensors (or of a difference
    of two index ranges with a number), or a triangular buffer."""
    seen, queue = set(masks), deque(masks)
    while queue and len(seen) < MASK_CONE_LIMIT:
        node = queue.popleft()
        if _is_call(node, CAUSAL_OPS):
            return True
        if _is_call(node, ORDER_COMPARISONS) and all(isinstance(a, Node) for a in node.args[:2]):
            return True
        if (_is_call(node, SCALAR_ORDER_COMPARISONS) and _is_call(_walk_up(node.args[0], TRANSPARENT_OPS)[0],
                                                                    {aten.sub.Tensor})
                and _selects_logits(node)):
            return True
        if node.op == "get_attr" and _is_triangular(_attribute(node)):
            return True
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                queue.append(arg)
    return False


def _selects_logits(node: Node) -> bool:
    """Whether a boolean `node` reaches, through layout ops only, something that selects or blocks logits."""
    frontier = [node]
    while frontier:
        for user in frontier.pop().users:
            if _is_call(user, MASK_CONSUMERS | SDPA_OPS.keys()):
                return True
            if _is_call(user, TRANSPARENT_OPS | REPEAT_OPS):
                frontier.append(user)
    return False


def _is_triangular(value: Any) -> bool:
    """A square constant whose nonzeros form a lower (keep) or strictly upper (block) triangle."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[-1] != value.shape[-2] or value.shape[-1] < 2:
        return False
    nonzero = value != 0
    ones = torch.ones(value.shape[-2:], dtype=torch.bool, device=value.device)
    return bool((nonzero == ones.tril()).all() or (nonzero == ones.triu(1)).all())


@dataclass
class _CacheRead:
    cat: Node
    past: Node
    """The cat operand holding the past K or V (one layer, [B, Hkv, L_past, D])."""
    new: Node
    placeholder: Node


def _cache_read(top: Node) -> _CacheRead | None:
    """K/V built as cat([past, new], seq dim) where `past` comes from a graph input."""
    if not _is_call(top, {aten.cat.default}):
        return None
    tensors, dim = top.args[0], top.args[1] if len(top.args) > 1 else 0
    rank = len(_shape(top))
    if len(tensors) != 2 or not rank or dim % rank != rank - 2:
        return None
    source, _ = _walk_up(tensors[0], TRANSPARENT_OPS | CACHE_INDEX_OPS)
    if source.op != "placeholder":
        return None
    return _CacheRead(top, tensors[0], tensors[1], source)


def _integer_inputs(q: Node, cross_projections: bool) -> list[str]:
    """Names of the integer graph inputs q depends on: without crossing projections, those that feed
    its position encoding (RoPE); crossing them, also those that enter the hidden states (absolute
    position embeddings, and the token ids)."""
    seen, queue, found = {q}, deque([q]), set()
    while queue:
        node = queue.popleft()
        value = _val(node)
        if node.op == "placeholder" and value is not None and not value.dtype.is_floating_point:
            found.add(node.name)
        if _is_call(node, PROJECTION_OPS) and not cross_projections:
            continue
        for arg in node.all_input_nodes:
            if _is_call(arg, SIZE_OPS):  # a sequence length read off input_ids (free sizes) is not a position
                continue
            if arg not in seen:
                seen.add(arg)
                queue.append(arg)
    return sorted(found)


def _placeholder_index(gm: GraphModule, node: Node | str) -> int:
    return [n.name if isinstance(node, str) else n for n in gm.graph.nodes if n.op == "placeholder"].index(node)


def _output_positions(gm: GraphModule, node: Node) -> list[int]:
    """Indices of the flattened graph outputs that are exactly `node`."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = torch.utils._pytree.tree_leaves(output.args[0])
    return [i for i, leaf in enumerate(flat) if leaf is node]


@dataclass(frozen=True)
class FxCacheRead:
    """Nodes of a site whose K/V are `cat(past graph input, new)` (an explicit-cache model)."""

    q_positions: str
    """The integer graph input that positions the new queries (their RoPE reads it); "" when q reads
    none directly, and the rewrite picks from `position_candidates` by their example values."""
    position_candidates: list[tuple[str, int]]
    """(name, placeholder index) of the integer graph inputs that reach q through its projections
    (absolute position embeddings, token ids)."""
    new_tokens: int
    """Queries of the captured step."""
    k_cat: str
    v_cat: str
    past_k: str
    past_v: str
    past_k_input: str
    past_v_input: str
    past_k_index: int
    past_v_index: int
    """Positions of those inputs among the graph's placeholders (the flattened example inputs)."""
    k_new: str
    v_new: str
    present_k_outputs: list[int]
    """Indices of the flattened graph outputs that return the present K (and V below)."""
    present_v_outputs: list[int]


@dataclass(frozen=True)
class FxMatch:
    """Where a site lives in one captured FX graph: what the explicit-cache rewrite and the
    cost model's symbols read (node names of `graph`, a submodule path of the capture)."""

    graph: str
    anchor: str
    q: str
    q_scale: float
    k: str
    v: str
    k_top: str
    v_top: str
    out: str
    masks: list[str]
    weights_used: bool
    """The attention probabilities are also used elsewhere (e.g. returned as attention weights)."""
    cache: FxCacheRead | None = None


def _describe(core: _Core, gm: GraphModule, graph_name: str, layer: int) -> AttentionSite:
    """Turn a matched core into an AttentionSite: KV heads, cache, cross, causality, owner module, projections."""
    k_top, k_path = _walk_up(core.k, TRANSPARENT_OPS | REPEAT_OPS)
    v_top, v_path = _walk_up(core.v, TRANSPARENT_OPS | REPEAT_OPS)
    repeat = _numel(core.k) / max(_numel(k_top), 1)
    num_kv_heads = core.heads_of_k / repeat if repeat >= 1 else core.heads_of_k
    if num_kv_heads < 1 or num_kv_heads != int(num_kv_heads) or core.num_heads % int(num_kv_heads):
        raise _Miss(f"cannot tell KV heads: {core.heads_of_k} heads seen, repeated {repeat:g}x")
    num_kv_heads = int(num_kv_heads)

    q_inner, q_factor = _walk_up_scaled(core.q)
    k_cache, v_cache = _cache_read(k_top), _cache_read(v_top)
    reads_cache = k_cache is not None and v_cache is not None
    k_source = k_cache.new if reads_cache else k_top
    v_source = v_cache.new if reads_cache else v_top
    q_proj, k_proj = _projection(q_inner), _projection(k_source)
    if q_proj is not None and k_proj is not None:
        q_sources, k_sources = _sources(q_proj), _sources(k_proj)
        if k_sources[0] not in q_sources and set(k_sources[1:]) & set(q_sources):
            raise _Miss("latent attention (MLA): keys and values are decompressed from a low-rank latent of the "
                        "hidden states; kvpass compacts caches of keys and values")
        # a low-rank query path still reads the same stream, and a routed one (mixture-of-attention experts)
        # gathers the tokens of that stream before its projection
        cross = k_sources[0] not in q_sources and _walk_up(q_sources[0], TRANSPARENT_OPS | ROUTING_OPS)[0] \
            is not k_sources[0]
    else:
        cross = not reads_cache and _shape(core.q)[-2] != _shape(k_top)[-2]

    q_unscaled, outer_q_factor = core.q, 1.0
    while (peeled := _peel_scale(q_unscaled)) is not None:
        q_unscaled, outer_q_factor = peeled[0], outer_q_factor * peeled[1]
    _, k_factor = _walk_up_scaled(k_top)
    anchor_group = [core.anchor] + ([q_proj] if q_proj is not None else [])
    cache = None
    if reads_cache:
        positions = _integer_inputs(q_unscaled, cross_projections=False)
        if len(positions) > 1:
            raise _Miss(f"the query's position encoding reads several integer inputs ({sorted(positions)})")
        cache = FxCacheRead(
            q_positions=positions[0] if positions else "",
            position_candidates=[] if positions else [
                (name, _placeholder_index(gm, name)) for name in _integer_inputs(q_unscaled, cross_projections=True)],
            new_tokens=_shape(q_unscaled)[-2], k_cat=k_cache.cat.name, v_cat=v_cache.cat.name, past_k=k_cache.past.name,
            past_v=v_cache.past.name, past_k_input=k_cache.placeholder.name, past_v_input=v_cache.placeholder.name,
            past_k_index=_placeholder_index(gm, k_cache.placeholder), past_v_index=_placeholder_index(gm, v_cache.placeholder),
            k_new=k_cache.new.name, v_new=v_cache.new.name, present_k_outputs=_output_positions(gm, k_cache.cat),
            present_v_outputs=_output_positions(gm, v_cache.cat),
        )
    match = FxMatch(
        graph=graph_name, anchor=core.anchor.name, q=q_unscaled.name, q_scale=outer_q_factor, k=core.k.name,
        v=core.v.name, k_top=k_top.name, v_top=v_top.name, out=core.out.name, masks=[m.name for m in core.masks],
        weights_used=core.weights_used, cache=cache,
    )
    projections = _projections(core, q_inner, k_source, v_source, num_kv_heads)
    nodes = core.nodes + k_path + v_path
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    value = _val(core.out)
    return AttentionSite(
        name=_owning_module(anchor_group), layer=layer, num_heads=core.num_heads, num_kv_heads=num_kv_heads,
        head_dim=core.head_dim, scale=core.scale * q_factor * k_factor,
        causal=core.causal_flag or _mask_is_causal(core.masks), cross=cross, masked=bool(core.masks),
        reads_cache=reads_cache, pattern=core.pattern, logit_ops=list(core.logit_ops), kv_tiled=_tiles_heads(k_path),
        dtype=str(value.dtype).removeprefix("torch.") if value is not None else "float32",
        nodes=[n.name for n in sorted(set(nodes), key=order.__getitem__)], projections=projections, match=match,
    )


def _tiles_heads(k_path: list[Node]) -> bool:
    """True if the KV heads reach the attention repeated whole (`k.repeat(1, g, 1, 1)`: query head h reads
    KV head h mod Hkv) rather than each one g times in a row (expand + reshape, repeat_interleave)."""
    for node in k_path:
        if _is_call(node, {aten.repeat.default}):
            repeats = list(node.args[1])
            if len(repeats) == 4 and repeats[1] > 1:  # [B, Hkv, T, D] -> [B, g*Hkv, T, D]
                return True
            if len(repeats) == 5 and repeats[1] > 1 and repeats[2] == 1:  # [B, 1, Hkv, T, D], merged after
                return True
    return False


# --- projection anchors -----------------------------------------------------------------------

FEATURE_SLICES = {aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
                  aten.narrow.default}
"""Ops that cut a fused projection's output features into the Q, K and V parts."""


def _weight_parameter(node: Any) -> tuple[str, str, bool] | None:
    """(module path, parameter name, transposed) of a weight operand read from a parameter."""
    top, path = _walk_up(node, TRANSPARENT_OPS) if isinstance(node, Node) else (node, [])
    if not isinstance(top, Node) or top.op != "get_attr":
        return None
    transposed = sum(n.target in (aten.t.default, aten.transpose.int, aten.permute.default) for n in path) % 2 == 1
    module, _, name = str(top.target).rpartition(".")
    return module, name, transposed


def _projection_weight(projection: Node) -> tuple[str, str, str | None, int, int] | None:
    """(module, weight name, bias name, output-feature axis of the weight, output features)."""
    args = _arguments(projection)
    if projection.target is aten.linear.default:
        weight, bias, layout_axis = args["weight"], args.get("bias"), 0  # weight [out, in]
    elif projection.target is aten.addmm.default:
        weight, bias, layout_axis = args["mat2"], args["self"], 1         # mat2 [in, out]
    else:
        weight, bias, layout_axis = args["mat2"], None, 1
    found = _weight_parameter(weight)
    if found is None:
        return None
    module, name, transposed = found
    axis = 1 - layout_axis if transposed else layout_axis
    bias_found = _weight_parameter(bias) if isinstance(bias, Node) else None
    if bias_found is not None and bias_found[0] != module:
        return None
    return module, name, bias_found[1] if bias_found else None, axis, _shape(projection)[-1]


def _reachable(start: Iterable[Node], neighbours: Callable[[Node], Iterable[Node]], limit: int) -> set[Node]:
    """`start` and the nodes reachable from it through `neighbours`, breadth first, at most about `limit`."""
    seen = {node for node in start if isinstance(node, Node)}
    queue = deque(seen)
    while queue and len(seen) < limit:
        for other in neighbours(queue.popleft()):
            if other not in seen:
                seen.add(other)
                queue.append(other)
    return seen


def _ancestors(node: Node, limit: int = 256) -> set[Node]:
    return _reachable([node], lambda n: n.all_input_nodes, limit)


def _feature_range(projection: Node, target: Node) -> tuple[int, int] | None:
    """The output features of `projection` that reach `target`: all of them, or the one range a
    slice/split of the feature axis (before heads are split off) selects on the way."""
    features = _shape(projection)[-1]
    above = _ancestors(target)
    ranges = set()
    frontier = [projection]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user not in above:
                continue
            cut = _cut_range(node, user, features, above) if _shape(node)[-1:] == (features,) else None
            if cut is not None:
                ranges.add(cut)
            elif _is_call(user, TRANSPARENT_OPS) and _shape(user)[-1:] == (features,):
                frontier.append(user)
    if len(ranges) > 1:
        return None
    return ranges.pop() if ranges else (0, features)


def _cut_range(source: Node, user: Node, features: int, above: set[Node]) -> tuple[int, int] | None:
    """The feature range `user` (a slice of `source`, or a split of it whose piece in `above` is
    read) keeps, if it cuts the last axis."""
    rank = len(_shape(source))
    if _is_call(user, {aten.slice.Tensor, aten.narrow.default}):
        args = _arguments(user)
        if args["dim"] % rank != rank - 1:
            return None
        if user.target is aten.narrow.default:
            return args["start"], args["start"] + args["length"]
        start, end = args.get("start") or 0, args.get("end")
        end = features if end is None else min(end, features)
        return start % features if start < 0 else start, end % features if end < 0 else end
    if _is_call(user, FEATURE_SLICES):
        args = _arguments(user)
        if args.get("dim", 0) % rank != rank - 1:
            return None
        if user.target is aten.chunk.default:
            sizes = [-(-features // args["chunks"])] * args["chunks"]
        elif user.target is aten.split.Tensor:
            sizes = [args["split_size"]] * -(-features // args["split_size"])
        else:
            sizes = list(args["split_sizes"])
        items = [u.args[1] for u in user.users if u.target is operator.getitem and u in above]
        if len(items) != 1:
            return None
        offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        return offsets[items[0]], min(offsets[items[0] + 1], features)
    return None


def _projection_of(node: Node, heads: int, head_dim: int) -> Projection | None:
    projection = _projection(node)
    if projection is None:
        return None
    weight = _projection_weight(projection)
    feature_range = _feature_range(projection, node)
    if weight is None or feature_range is None or feature_range[1] - feature_range[0] != heads * head_dim:
        return None
    module, name, bias, axis, _ = weight
    return Projection(module, name, bias, axis, *feature_range)


def _output_projection(out: Node, width: int) -> Projection | None:
    """The projection that reads the attention output (after the heads are merged), as input features."""
    frontier = [out]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if _is_call(user, PROJECTION_OPS) and _arguments(user)[PROJECTION_OPS[user.target]] is node:
                weight = _projection_weight(user)
                if weight is None or _shape(node)[-1] != width:
                    return None
                module, name, bias, axis, _ = weight
                return Projection(module, name, bias, 1 - axis, 0, width)
            if _is_call(user, TRANSPARENT_OPS) and user.args[0] is node:
                frontier.append(user)
    return None


def _projections(core: _Core, q: Node, k: Node, v: Node, num_kv_heads: int) -> Projections | None:
    """Q/K/V/O projection anchors of a site, or None when any of them is not a plain weight in the graph."""
    roles = (
        _projection_of(q, core.num_heads, core.head_dim),
        _projection_of(k, num_kv_heads, core.head_dim),
        _projection_of(v, num_kv_heads, core.head_dim),
        _output_projection(core.out, core.num_heads * core.head_dim),
    )
    return Projections(*roles) if all(role is not None for role in roles) else None


def find_sites(gm: GraphModule) -> SiteReport:
    """Every attention in `gm` (and in its GraphModule children), in graph order.

    Example:
        >>> report = find_sites(capture(model, (x,)).graph_module)   # doctest: +SKIP
        >>> [(s.name, s.num_heads, s.num_kv_heads) for s in report]  # doctest: +SKIP
    """
    report = SiteReport()
    for graph_name, module in gm.named_modules():
        if not isinstance(module, GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function" or node.target not in SDPA_OPS.keys() | SOFTMAX_OPS:
                continue
            try:
                core = _match_sdpa(node) if node.target in SDPA_OPS else _match_softmax_chain(node)
                if core is not None:
                    report.append(_describe(core, module, graph_name, len(report)))
            except _Miss as miss:
                report.unsupported.append(UnsupportedAttention(
                    name=_owning_module([node]), pattern="sdpa" if node.target in SDPA_OPS else "eager_softmax_chain",
                    reason=str(miss), nodes=[node.name]))
    _name_inline_layers(report)
    return report


def _name_inline_layers(report: SiteReport) -> None:
    """Sites written inline in one module (a decoder looping over its layers' weights) share that module's
    path: name each by the module of its own Q projection instead. Sites that share their projections too
    (one module run twice, two attentions per layer) keep the shared name, which says so."""
    names = [site.name for site in report]
    owners = [site.projections.q.module if site.projections is not None else None for site in report]
    for site, owner in zip(report, owners):
        if names.count(site.name) > 1 and owner is not None and owners.count(owner) == 1:
            site.name = owner


# --- rewrite ----------------------------------------------------------------------------------

CachedAttention = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""`fn(q, k_new, v_new, past_k, past_v, q_positions) -> (out, present_k, present_v)`.

q is [B, Hq, Lq, D] before any softmax scale; K/V are un-repeated [B, Hkv, L, D]; out is [B, Hq, Lq, D]
like SDPA's; present K/V may be shorter than past + new (that is the point: a physically pruned cache).
"""


def rewrite_cached_sites(
    gm: GraphModule, sites: Iterable[AttentionSite], make_replacement: Callable[[AttentionSite], CachedAttention]
) -> GraphModule:
    """Replace each cache-reading site's cat(past, new) + GQA repeat + attention by one call.

    The call is `make_replacement(site)` (chosen by the caller, so this pass knows nothing of
    kernels or runtime); uses of the attention output are rewired to its first result and every
    other use of the K/V cats (the graph's present-cache outputs) to its second and third. The
    rewrite happens in place; `gm` is recompiled and returned.
    """
    for site in sites:
        if not site.reads_cache:
            continue
        match: FxMatch = site.match
        graph_module = gm.get_submodule(match.graph) if match.graph else gm
        graph = graph_module.graph
        node = {n.name: n for n in graph.nodes}
        cache = match.cache
        if len(_shape(node[match.out])) != 4:
            raise ValueError(f"{site.name}: attention output is not [batch, heads, seq, head_dim]")
        inputs = [node[name] for name in (match.q, cache.k_new, cache.v_new, cache.past_k, cache.past_v,
                                          cache.q_positions)]
        spanned = {node[name] for name in site.nodes}
        with graph.inserting_before(node[match.out]):
            call = graph.call_function(make_replacement(site), tuple(inputs))
            out, present_k, present_v = (graph.call_function(operator.getitem, (call, i)) for i in range(3))
        for inserted in (call, out, present_k, present_v):  # they belong to the site's module, as what they replace did
            inserted.meta["nn_module_stack"] = dict(node[match.out].meta.get("nn_module_stack", {}))
        node[match.out].replace_all_uses_with(out)
        cats = (node[cache.k_cat], node[cache.v_cat])
        for cat, present in zip(cats, (present_k, present_v)):
            cat.replace_all_uses_with(present, delete_user_cb=lambda user: user not in spanned)
        for replaced in reversed([n for n in graph.nodes if n in spanned or n in cats]):
            if not replaced.users:  # erased by hand: fused attention ops count as impure for DCE
                graph.erase_node(replaced)
    for module in gm.modules():
        if isinstance(module, GraphModule):
            module.graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_function" or n.is_impure())
            module.recompile()
    return gm
