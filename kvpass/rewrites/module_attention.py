"""Rewrite the attention a module computes itself onto one call over a compacted cache.

Some transformers modules (BLOOM, Falcon, GPT-J, XGLM, BERT-style decoders, ...) never reach transformers'
attention interface: they update the cache, then compute softmax(q·kᵀ + bias)·v with their own ops.
`kvpass.runtime.traced_attention` captures such a module's forward with the cache's past K/V as two graph
inputs, so the update is `cat(past, new)` and `find_sites` describes the site; this pass rewrites it:

* each `cat(past, new)` becomes a *length carrier*: a meta tensor of the logical length (past + new), so
  what the module derives from the cache's length (mask slices, bias buffers, size checks) still holds,
  and no full-length K/V is ever materialised (a real op reading the carrier fails loudly: meta tensors
  hold no data);
* the score product becomes zeros of its shape, so the ops between it and the softmax (scale, masks,
  ALiBi, relative-position terms) compute the additive *logit bias* over logical positions, which the
  compacted cache reads at the slots it keeps;
* `probs @ v` becomes `attend(q, k_new, v_new, bias, causal)`, the caller's attention over the compacted
  cache, in the layout the module's next op expects; the softmax and the score ops die.

Logits passed through anything but a clamp, probabilities used beyond `probs @ v`, and a cache read by other
ops are refused by name: the rewrite never changes what a module computes silently.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch.fx import GraphModule, Node

from kvpass.errors import UnsupportedModelError
from kvpass.rewrites.fx import (REPEAT_OPS, SDPA_OPS, SIZE_OPS, SOFTMAX_OPS, TRANSPARENT_OPS, _arguments,
                                _find_scores, _is_call, _walk_up_scaled)
from kvpass.site import AttentionSite

aten = torch.ops.aten

ModuleAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool, float], torch.Tensor]
"""`attend(q, k_new, v_new, bias, causal, scale) -> out`: q [B, Hq, L, D], the call's new K/V [B, Hkv, L, D],
`bias` [B, 1 | Hq, L, past + L] over logical positions (float added to the logits, or bool: visible) or
None, `scale` the softmax scale still to apply to q·kᵀ; out [B, Hq, L, D]."""

RELABELLING_OPS = TRANSPARENT_OPS | REPEAT_OPS | {aten.slice.Tensor, aten.select.int, operator.getitem}
"""Ops that view a length carrier another way (free on a meta tensor)."""
CARRIER_READERS = RELABELLING_OPS | SIZE_OPS
"""Ops that may consume a length carrier: they relabel it or read its sizes."""


def rewrite_module_attention(gm: GraphModule, site: AttentionSite, attend: ModuleAttention) -> GraphModule:
    """Rewrite `site` (found in `gm` by `find_sites`, reading its cache as `cat(past input, new)`) onto
    `attend`, in place; `gm` is recompiled and returned."""
    match = site.match
    unsupported = sorted(set(site.logit_ops) - {"clamp"})
    if unsupported or site.kv_tiled:
        raise UnsupportedModelError(
            f"{site.name} computes attention itself with {unsupported or 'KV heads repeated whole'}: kvpass rewrites "
            "a self-computed attention only when its logits are scale, masks and additive biases")
    graph = gm.graph
    node = {n.name: n for n in graph.nodes}
    if match.cache is None:
        raise UnsupportedModelError(f"{site.name}: its keys and values do not come from the call's cache update")
    k_new, v_new = node[match.cache.k_new], node[match.cache.v_new]
    for cat in (node[match.cache.k_cat], node[match.cache.v_cat]):
        with graph.inserting_after(cat):
            carrier = graph.call_function(length_carrier, tuple(cat.args[0]))
        cat.replace_all_uses_with(carrier)
        graph.erase_node(cat)
    anchor, out = node[match.anchor], node[match.out]
    if site.pattern == "sdpa":
        rule, arguments = SDPA_OPS[anchor.target], _arguments(anchor)
        bias = arguments.get(rule.mask) if rule.mask else None
        causal = bool(arguments.get(rule.causal, False))
    else:
        producer = _find_scores(anchor.args[0]).producer
        with graph.inserting_before(producer):
            zeros = graph.call_function(ZeroLogits(producer.target), producer.args, dict(producer.kwargs))
        producer.replace_all_uses_with(zeros)
        graph.erase_node(producer)
        bias, causal = anchor.args[0], False  # the bias carries the model's causality
    q = node[match.q]
    # the site's scale, less what q carries already (scaled before it was viewed into heads)
    scale = (site.scale if site.scale is not None else site.head_dim ** -0.5) / _walk_up_scaled(q)[1]
    with graph.inserting_before(out):
        call = graph.call_function(_in_layout(attend, site.num_heads, causal, scale, _rank(out)),
                                   (q, k_new, v_new, bias))
    out.replace_all_uses_with(call)
    _drop_returned_probabilities(graph, anchor)
    for assertion in [n for n in graph.nodes if n.target is aten._assert_tensor_metadata.default]:
        graph.erase_node(assertion)  # they pin the nodes they check (and would check a carrier's device)
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_function")
    _check_rewritten(graph, site)
    gm.recompile()
    return gm


def _drop_returned_probabilities(graph: torch.fx.Graph, softmax: Node) -> None:
    """Modules that return their attention probabilities (for `output_attentions`) return None instead: the
    pruned model's attention covers the kept keys only, and a full-length map of them is not kept."""
    views = [user for user in _users_through(softmax, TRANSPARENT_OPS) if _is_call(user, TRANSPARENT_OPS)]
    returned = {softmax, *views}
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = torch.utils._pytree.tree_map(lambda a: None if a in returned else a, output.args)


def _rank(node: Node) -> int:
    value = node.meta.get("val")
    return value.dim() if isinstance(value, torch.Tensor) else 0


def _check_rewritten(graph: torch.fx.Graph, site: AttentionSite) -> None:
    """Nothing of the old attention may still run: no softmax over the carriers' logits, no op reading a
    carrier's (absent) data."""
    for n in graph.nodes:
        if _is_call(n, SOFTMAX_OPS) and any(_reads_carrier(a) for a in n.all_input_nodes):
            raise UnsupportedModelError(
                f"{site.name} uses its attention probabilities beyond weighting the values (mixes them into other "
                "values): kvpass cannot give probabilities over keys it evicted")
    for n in graph.nodes:
        if n.target is length_carrier:
            for user in _users_through(n, RELABELLING_OPS):
                if user.target not in CARRIER_READERS and not isinstance(user.target, ZeroLogits):
                    raise UnsupportedModelError(
                        f"{site.name} reads its cached keys or values beyond attention ({user.target}): kvpass "
                        "cannot run it over a compacted cache")


def _users_through(node: Node, through: frozenset) -> list[Node]:
    """The users of `node`, and theirs wherever a user is one of the `through` ops."""
    found, frontier = [], [node]
    while frontier:
        for user in frontier.pop().users:
            found.append(user)
            if _is_call(user, through):
                frontier.append(user)
    return found


def _reads_carrier(node: Node, limit: int = 64) -> bool:
    seen, frontier = set(), [node]
    while frontier and len(seen) < limit:
        current = frontier.pop()
        if current.target is length_carrier or isinstance(current.target, ZeroLogits):
            return True
        seen.add(current)
        frontier += [a for a in current.all_input_nodes if a not in seen]
    return False


def length_carrier(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """A meta tensor shaped like `cat([past, new], -2)`: the cache's logical length, without its data."""
    shape = list(new.shape)
    shape[-2] += past.shape[-2]
    return torch.empty(shape, dtype=new.dtype, device="meta")


class ZeroLogits:
    """Zeros shaped like the score product `op(*args, **kwargs)` (its operands may be length carriers), plus
    what `baddbmm` adds to the product (β·input: ALiBi's bias), so the ops after it compute the logit bias."""

    def __init__(self, op):
        self.op = op
        self.__name__ = "kvpass_zero_logits"

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        on_meta = torch.utils._pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t,
                                               (args, kwargs))
        shape = self.op(*on_meta[0], **on_meta[1]).shape
        real = next(t for t in torch.utils._pytree.tree_leaves(args)
                    if isinstance(t, torch.Tensor) and t.device.type != "meta")
        zeros = torch.zeros(shape, dtype=real.dtype, device=real.device)
        if self.op is aten.baddbmm.default:
            zeros = zeros + kwargs.get("beta", 1) * args[0]
        return zeros


def _in_layout(attend: ModuleAttention, heads: int, causal: bool, scale: float, out_rank: int):
    """`attend` on [B, H, L, D] tensors, from and back to a layout with batch and heads folded ([B·H, L, D])."""
    def attend_in_layout(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
        if q.dim() == 3:
            q = q.reshape(-1, heads, *q.shape[-2:])
        if bias is not None and bias.dim() == 3:  # the logits' own layout: [B·H, L, S]
            bias = bias.reshape(-1, heads, *bias.shape[-2:])
        elif bias is not None and bias.dim() == 2:  # one [L, S] mask for every row and head
            bias = bias[None, None]
        out = attend(q, k_new, v_new, bias, causal, scale)
        return out.reshape(-1, *out.shape[-2:]) if out_rank == 3 else out

    attend_in_layout.__name__ = attend.__name__
    return attend_in_layout
