"""Find where a vision-language model's image features enter its language model, in an FX graph.

A vision-language model embeds the prompt's token ids, runs its vision encoder on the image
input, projects the features, and writes them into the token embeddings at the positions of the
image tokens before the language model runs. In the graph that write is one op (`BOUNDARY_OPS`):

    merged = masked_scatter(embeddings, mask, features)
    merged = index_put(embeddings, [positions], features)

and it is recognised by its operands, never by the model's class:

* `embeddings` come from an embedding lookup of an integer graph input (the token ids);
* `mask` / `positions` compare those token ids with constants: the image token ids;
* `features` depend on a floating-point graph input (the pixels) through non-causal attention
  sites (the vision encoder), and the merged embeddings reach causal ones (the language model).

From the match come the anchor's module paths (the owner of the write, the language model and
its decoder layers, the vision encoder), the vision encoder's last attention before the features
(whose attention ranks patches), and the learned tokens it prepends to the patches (a [CLS]: a
`cat` along the token axis of a parameter-only operand before the patches).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch.fx import GraphModule, Node

from kvpass.anchors import VisionBoundary
from kvpass.rewrites.fx import (PROJECTION_OPS, TRANSPARENT_OPS, _arguments, _attribute, _constant, _is_call,
                                _module_stack, _reachable, _shape, _val, _walk_up)
from kvpass.site import SiteReport

aten = torch.ops.aten

BOUNDARY_OPS: dict[object, tuple[str, str, str]] = {
    aten.masked_scatter.default: ("self", "mask", "source"),
    aten.masked_scatter_.default: ("self", "mask", "source"),
    aten.index_put.default: ("self", "indices", "values"),
    aten.index_put_.default: ("self", "indices", "values"),
    aten._unsafe_index_put.default: ("self", "indices", "values"),
}
"""Ops that write rows of one tensor into another at selected positions: (target, where, rows) arguments."""

REGROUPING_OPS = frozenset({aten.cat.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
                            aten.chunk.default, aten._to_copy.default, aten.to.dtype_layout})
"""Ops between the projection and the write that split the rows per image and join them again."""

TOKEN_COMPARISONS = frozenset({aten.eq.Scalar, aten.eq.Tensor, aten.isin.Tensor_Scalar, aten.isin.Tensor_Tensor})
"""How a mask of image-token positions is computed from the token ids."""

ANCESTOR_LIMIT = 200_000
"""Most nodes walked from one node (a whole model's graph fits)."""


class _Miss(Exception):
    """A write that is not a vision boundary; the message says which check failed."""


def find_vision_boundary(gm: GraphModule, report: SiteReport) -> None:
    """Record the vision boundary of `gm` on `report` (`report.vision`, or `report.vision_note` saying
    why there is none) and move the vision encoder's sites out of the report's list: they keep no KV
    cache. The language model's sites are renumbered from 0.

    Example:
        >>> report = find_sites(graph_module); find_vision_boundary(graph_module, report)  # doctest: +SKIP
        >>> report.vision.language_model                                                     # doctest: +SKIP
        'model.language_model'
    """
    candidates = [(name, node) for name, module in gm.named_modules() if isinstance(module, GraphModule)
                  for node in module.graph.nodes if _is_call(node, BOUNDARY_OPS)]
    if not candidates:
        report.vision_note = ("no op in the captured graph writes rows into the token embeddings "
                              f"({', '.join(sorted({str(op).split('.')[-2] for op in BOUNDARY_OPS}))})")
        return
    reasons = []
    for graph_name, node in candidates:
        try:
            boundary = _describe(node, graph_name, report)
        except _Miss as miss:
            reasons.append(f"{node.name}: {miss}")
            continue
        _split_sites(report, boundary)
        return
    report.vision_note = "; ".join(reasons)


def _describe(write: Node, graph_name: str, report: SiteReport) -> VisionBoundary:
    target_name, where_name, rows_name = BOUNDARY_OPS[write.target]
    args = _arguments(write)
    embeddings, where, rows = args[target_name], args[where_name], args[rows_name]
    lookup = _embedding_lookup(embeddings)
    if lookup is None:
        raise _Miss("the written tensor is not an embedding lookup of token ids")
    token_input, _ = _walk_up(_arguments(lookup)["indices"], TRANSPARENT_OPS)
    if token_input.op != "placeholder":
        raise _Miss("the embedding lookup does not read a graph input")
    image_token_ids = _compared_ids(where, token_input)
    if not image_token_ids:
        raise _Miss("the written positions are not chosen by comparing the token ids with constants")
    if not isinstance(rows, Node):
        raise _Miss("the written rows are not computed in the graph")

    upstream = _ancestors([rows])
    if not any(n.op == "placeholder" and _is_floating(n) for n in upstream):
        raise _Miss("the written rows do not depend on a floating-point input (the pixels)")
    producer = _rows_producer(rows)
    if producer is None or not _module_stack(producer):
        raise _Miss("the written rows are not the output of a projection module")

    in_graph = [site for site in report if (site.match.graph if site.match is not None else None) == graph_name]
    nodes = {n.name: n for n in write.graph.nodes}
    encoder = [site for site in in_graph if not site.causal and nodes.get(site.match.anchor) in upstream]
    downstream = _descendants(write)
    language = [site for site in in_graph if site.causal and nodes.get(site.match.anchor) in downstream]
    if not encoder:
        raise _Miss("no non-causal attention (a vision encoder) computes the written rows")
    if not language:
        raise _Miss("the merged embeddings reach no causal attention (a language model)")

    owner_stack = _module_stack(write)
    language_stack = _module_stack(nodes[language[0].match.anchor])
    encoder_stack = _module_stack(nodes[encoder[0].match.anchor])
    language_model, vision_encoder = _first_below(language_stack, owner_stack), _first_below(encoder_stack, owner_stack)
    embedding = _module_stack(lookup)
    if language_model is None or vision_encoder is None or not embedding:
        raise _Miss("the vision encoder, the language model and the embedding are not submodules of the module "
                    "that writes the rows")
    above_layers = language_stack[:language_stack.index(language_model) + 1]
    layers = tuple(_first_below(_module_stack(nodes[site.match.anchor]), above_layers) for site in language)
    if None in layers or len(set(layers)) != len(layers):
        raise _Miss("the language model's attention sites are not in one decoder layer each")
    # the vision side: what computes the features, and the rest of the encoder (layers whose output is unused)
    vision_side = {site.name for site in encoder} | {site.name for site in report if _inside(site.name, vision_encoder)}
    return VisionBoundary(
        owner=owner_stack[-1] if owner_stack else "", language_model=language_model, language_layers=layers,
        embedding=embedding[-1], vision_encoder=vision_encoder, pixel_site=encoder[0].name,
        scoring_site=encoder[-1].name, feature_module=_module_stack(producer)[-1],
        class_tokens=_class_tokens(nodes[encoder[0].match.anchor]), token_input=token_input.name,
        image_token_ids=image_token_ids, op=str(write.target).split(".")[-2].rstrip("_").removeprefix("_unsafe_"),
        encoder_sites=tuple(site.name for site in report if site.name in vision_side),
    )


def _split_sites(report: SiteReport, boundary: VisionBoundary) -> None:
    """Keep the language model's sites in the report (renumbered); the vision side's are listed in the anchor."""
    kept = [site for site in report if site.name not in boundary.encoder_sites]
    for layer, site in enumerate(kept):
        site.layer = layer
    report[:] = kept
    report.unsupported = [u for u in report.unsupported if not _inside(u.name, boundary.vision_encoder)]
    report.vision = boundary


def _inside(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def _embedding_lookup(node: object) -> Node | None:
    """The `embedding` op at the top of `node`, through layout moves and earlier writes (a video's after an image's)."""
    while isinstance(node, Node):
        if _is_call(node, {aten.embedding.default}):
            return node
        if _is_call(node, TRANSPARENT_OPS) or _is_call(node, BOUNDARY_OPS):
            node = node.args[0]
            continue
        return None
    return None


def _compared_ids(where: object, token_input: Node) -> tuple[int, ...]:
    """The constants the token ids are compared with on the way to the written positions."""
    found: set[int] = set()
    for node in _ancestors(where if isinstance(where, (list, tuple)) else [where], limit=512):
        if not _is_call(node, TOKEN_COMPARISONS):
            continue
        operands = list(node.args[:2])
        if not isinstance(operands[0], Node) or _walk_up(operands[0], TRANSPARENT_OPS)[0] is not token_input:
            continue
        other = operands[1]
        values = [_constant(other)] if not isinstance(other, (list, tuple)) else [_constant(v) for v in other]
        if isinstance(other, Node) and other.op == "get_attr" and values == [None]:
            constant = _attribute(other)
            values = constant.flatten().tolist() if isinstance(constant, torch.Tensor) else [None]
        if None not in values and all(float(v).is_integer() for v in values):
            found.update(int(v) for v in values)
    return tuple(sorted(found))


def _rows_producer(rows: Node) -> Node | None:
    """The projection whose output rows become the written rows, through layout moves and the
    splits and concatenations that regroup them per image."""
    node: object = rows
    while isinstance(node, Node) and node.op == "call_function":
        if _is_call(node, PROJECTION_OPS):
            return node
        if not (_is_call(node, TRANSPARENT_OPS | REGROUPING_OPS) or node.target is operator.getitem):
            return None
        node = node.args[0][0] if isinstance(node.args[0], (list, tuple)) else node.args[0]
    return None


def _class_tokens(first_attention: Node) -> int:
    """Learned tokens prepended to the patches before the first attention: the leading operands of a
    `cat` along the token axis of [batch, tokens, features] that depend on no graph input, in front of
    one that depends on the pixels (e.g. CLIP's class embedding)."""
    for node in _ancestors([first_attention]):
        if not _is_call(node, {aten.cat.default}) or len(_shape(node)) != 3:
            continue
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        if dim % 3 != 1:
            continue
        inputs = [{n for n in _ancestors([tensor]) if n.op == "placeholder"} for tensor in tensors]
        prefix = 0
        for tensor, placeholders in zip(tensors, inputs):
            if placeholders:
                break
            prefix += _shape(tensor)[1]
        if prefix and any(_is_floating(n) for group in inputs for n in group):
            return prefix
    return 0


def _is_floating(node: Node) -> bool:
    value = _val(node)
    return value is not None and value.dtype.is_floating_point


def _first_below(stack: list[str], above: list[str]) -> str | None:
    """The outermost module of `stack` that is not one of `above` (which must be its prefix)."""
    if stack[:len(above)] != above or len(stack) == len(above):
        return None
    return stack[len(above)]


def _ancestors(nodes: Iterable[object], limit: int = ANCESTOR_LIMIT) -> set[Node]:
    return _reachable([n for n in nodes if isinstance(n, Node)], lambda n: n.all_input_nodes, limit)


def _descendants(node: Node) -> set[Node]:
    return _reachable([node], lambda n: n.users, ANCESTOR_LIMIT)
