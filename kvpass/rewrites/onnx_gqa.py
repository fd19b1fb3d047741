"""ONNX graph pass: a standard `Attention` reads grouped K/V heads itself, so the GQA repeat in front of it goes.

`torch.onnx.export` of transformers' `repeat_kv` + SDPA writes Unsqueeze(axis 2) → Expand → Reshape on the
cached K and V before an opset-23 `Attention`: every decode step copies the whole cache out to the query
heads' count. The op takes K/V with fewer heads than Q (GQA: query head h reads KV head h // (Hq / Hkv),
which is `repeat_kv`'s order), so the copy is dropped and the op is given the cache itself. Only that form
is removed: an unsqueeze on axis 2 of a 4-D [B, Hkv, T, D] value, reshaped back to 4-D with a multiple of
its heads, feeding K or V of a standard-domain `Attention` with a 4-D query.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass


def drop_gqa_repeats(model: ir.Model) -> int:
    """Feed every standard `Attention` of `model`'s main graph its un-repeated K/V, in place; returns how many."""
    dropped = 0
    for node in list(model.graph):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
            continue
        query = node.inputs[0]
        sources = [_repeated_source(node.inputs[index], query) for index in (1, 2)]
        if any(source is None for source in sources):
            continue
        for index, source in zip((1, 2), sources):
            node.replace_input_with(index, source)
        dropped += 1
    if dropped:
        RemoveUnusedNodesPass()(model)
    return dropped


def _repeated_source(value: ir.Value | None, query: ir.Value | None) -> ir.Value | None:
    """The [B, Hkv, T, D] value that `value` repeats to the query's heads (Unsqueeze axis 2 → Expand → Reshape),
    or None."""
    reshape = value.producer() if value is not None else None
    expand = _producer(reshape, "Reshape", 0)
    unsqueeze = _producer(expand, "Expand", 0)
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.inputs) < 2:
        return None
    axes = unsqueeze.inputs[1].const_value if unsqueeze.inputs[1] is not None else None
    if axes is None or np.asarray(axes.numpy()).reshape(-1).tolist() not in ([2], [-3]):
        return None
    source = unsqueeze.inputs[0]
    heads, query_heads = _dim(source, 1, rank=4), _dim(query, 1, rank=4)
    repeated = _dim(value, 1, rank=4)
    if heads is None or query_heads is None or repeated != query_heads or query_heads % heads:
        return None
    return source


def _producer(node: ir.Node | None, op_type: str, index: int) -> ir.Node | None:
    """The producer of input `index` of `node`, if `node` is an `op_type`."""
    if node is None or node.op_type != op_type or node.inputs[index] is None:
        return None
    return node.inputs[index].producer()


def _dim(value: ir.Value | None, axis: int, rank: int) -> int | None:
    """`value`'s size on `axis` when its shape has `rank` dims and that size is a known integer."""
    shape = value.shape if value is not None else None
    if shape is None or len(shape) != rank or not isinstance(shape[axis], int):
        return None
    return shape[axis]
