"""kvpass.onnx over graphs fused for onnxruntime: com.microsoft MultiHeadAttention and GroupQueryAttention
rewritten (the fused op kept over the compacted cache), what they cannot compute after compaction refused by name."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnx_ir.tape import Tape
from test_onnx import HEAD_DIM, HEADS, KV_HEADS, LAYERS, assert_same_cache, padded_batch, prompt, tiny_llama, torch_generate

import kvpass
import kvpass.onnx
from kvpass.errors import UnsupportedModelError
from kvpass.onnx.export import export_onnx
from kvpass.runtime.call_arguments import output_cache

ort_fusions = pytest.importorskip("onnxscript.rewriter.ort_fusions")


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def fused(base, tmp_path_factory) -> onnx.ModelProto:
    """The tiny Llama's opset-18 export, fused by onnxscript for onnxruntime: its attention becomes one
    MultiHeadAttention per layer over Concat(past, new) K/V, RMSNorm and RoPE become contrib ops too."""
    exported = export_onnx(base, tmp_path_factory.mktemp("fused") / "tiny18.onnx", budget=1.0, opset=18)
    model = ir.from_proto(exported)
    ort_fusions.optimize_for_ort(model)
    proto = ir.to_proto(model)
    assert [n.op_type for n in proto.graph.node if n.op_type.endswith("Attention")] == ["MultiHeadAttention"] * LAYERS
    return proto


def fused_ops(proto: onnx.ModelProto) -> list[str]:
    return sorted(n.op_type for n in proto.graph.node if n.domain == "com.microsoft")


def test_fused_multihead_attention_is_found_with_its_cache(fused) -> None:
    report = kvpass.onnx.find_attention(fused)
    assert [s.pattern for s in report] == ["ms_multihead_attention"] * LAYERS and not report.unsupported
    for layer, site in enumerate(report):
        assert (site.num_kv_heads, site.head_dim, site.reads_cache) == (KV_HEADS, HEAD_DIM, True)
        assert (site.match.past_key.name, site.match.present_value.name) == (f"past_k_{layer}", f"present_v_{layer}")


@pytest.fixture(scope="module")
def graphs(fused) -> dict[str, onnx.ModelProto]:
    return {"MultiHeadAttention": fused, "GroupQueryAttention": grouped_query_graph(fused)}


FUSED_OPS = ["MultiHeadAttention", "GroupQueryAttention"]


def own_logits(proto: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    """The graph's logits for a prompt, run as is by onnxruntime (empty cache)."""
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    feeds.update({f"past_{kv}_{layer}": np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)
                  for layer in range(LAYERS) for kv in "kv"})
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]


@pytest.mark.parametrize("op", FUSED_OPS)
def test_budget_one_is_the_unpruned_fused_run(graphs, base, op) -> None:
    """Budget 1.0 adds no eviction: the logits are the fused graph's own, bit for bit, and the tokens torch's."""
    ids = prompt()
    generator = kvpass.onnx.Generator(kvpass.onnx.optimize(graphs[op], budget=1.0))
    generator.reset(1)
    np.testing.assert_array_equal(generator.step(ids.numpy()), own_logits(graphs[op], ids.numpy()))
    tokens = generator.generate(ids, max_new_tokens=12)
    assert np.array_equal(tokens, base.generate(ids, max_new_tokens=12, do_sample=False).numpy())


@pytest.mark.parametrize("method", [None, "knorm", "h2o", "snapkv"])
@pytest.mark.parametrize("op", FUSED_OPS)
def test_half_budget_keeps_what_torch_keeps_through_the_fused_op(graphs, base, op, method) -> None:
    """The pruned graph still attends with the fused op, over the compacted cache; its companion scoring
    keeps the torch path's tokens (tova's, h2o's and snapkv's attention, knorm's norms), under the byte
    cap at every step, each of which evicts."""
    ids, new = prompt(), 12
    pruned = kvpass.onnx.optimize(graphs[op], budget=0.5, method=method, evict_every=1)
    assert fused_ops(pruned) == fused_ops(graphs[op])
    generator = kvpass.onnx.Generator(pruned)
    generator.reset(1)
    tokens, chunk = [ids.numpy()], ids.numpy()
    for _ in range(new):
        chunk = generator.step(chunk)[:, -1:].argmax(-1)
        tokens.append(chunk)
        assert generator.cache_bytes() <= 0.5 * generator.full_cache_bytes()
    expected, cache = torch_generate(kvpass.optimize(copy.deepcopy(base), budget=0.5, method=method, evict_every=1),
                                     ids, new)
    assert np.array_equal(np.concatenate(tokens, axis=1), expected)
    assert_same_cache(generator, cache, ids.shape[1] + new - 1)


def test_padded_batch_through_multihead_attention(fused, base) -> None:
    (ids, mask), new = padded_batch(), 8
    generator = kvpass.onnx.Generator(kvpass.onnx.optimize(fused, budget=0.5, evict_every=1))
    tokens = generator.generate(ids, max_new_tokens=new, attention_mask=mask)
    out = kvpass.optimize(copy.deepcopy(base), budget=0.5, evict_every=1).generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    assert np.array_equal(tokens, out.sequences.numpy())
    assert_same_cache(generator, output_cache(out), ids.shape[1] + new - 1)


def test_multihead_attention_masking_inside_is_refused_for_scored_methods(fused) -> None:
    """unidirectional=1 masks inside the op, where the companion scoring cannot see it; knorm and paged need no
    scores, while the default (paged_tova) weighs in attention too, so it is refused like tova."""
    model = ir.from_proto(fused)
    for node in (n for n in model.graph if n.op_type == "MultiHeadAttention"):
        node.attributes["unidirectional"] = ir.AttrInt64("unidirectional", 1)
    proto = ir.to_proto(model)
    with pytest.raises(UnsupportedModelError, match="MultiHeadAttention nodes .* unidirectional=1"):
        kvpass.onnx.optimize(proto, budget=0.5, method="tova")
    with pytest.raises(UnsupportedModelError, match="MultiHeadAttention nodes .* unidirectional=1"):
        kvpass.onnx.optimize(proto, budget=0.5)
    kvpass.onnx.optimize(proto, budget=0.5, method="knorm")
    kvpass.onnx.optimize(proto, budget=0.5, method="paged")


def test_multihead_attention_keeping_its_cache_inside_is_refused_by_name(fused) -> None:
    """A MultiHeadAttention fed past_key/past_value (onnxruntime's own cache handling) is named, not half-pruned."""
    model = ir.from_proto(fused)
    node = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    past = [v for v in model.graph.inputs if v.name in ("past_k_0", "past_v_0")]
    node.resize_inputs(8)
    node.replace_input_with(6, past[0])
    node.replace_input_with(7, past[1])
    with pytest.raises(UnsupportedModelError, match=f"{node.name}.*past_key"):
        kvpass.onnx.optimize(ir.to_proto(model), budget=0.5)


def test_grouped_query_attention_refuses_what_it_cannot_compute_after_compaction(graphs, fused) -> None:
    """do_rotary=1 would rotate at seqlens_k (kept tokens, not positions); a left-padded batch is outside the
    op's right-padded seqlens_k, pruned or not: both are named."""
    with pytest.raises(UnsupportedModelError, match="GroupQueryAttention node .*do_rotary=1 rotates"):
        kvpass.onnx.optimize(grouped_query_graph(fused, do_rotary=1), budget=0.5)
    for attribute, value in (("local_window_size", 8), ("softcap", 30.0), ("kv_cache_bit_width", 4)):
        with pytest.raises(UnsupportedModelError, match=f"GroupQueryAttention node .*attribute {attribute}"):
            kvpass.onnx.optimize(grouped_query_graph(fused, **{attribute: value}), budget=0.5)
    ids, mask = padded_batch()
    generator = kvpass.onnx.Generator(kvpass.onnx.optimize(graphs["GroupQueryAttention"], budget=0.5))
    with pytest.raises(UnsupportedModelError, match="left-padded batch is outside what the op computes"):
        generator.generate(ids, max_new_tokens=2, attention_mask=mask)


def grouped_query_graph(fused: onnx.ModelProto, **attributes) -> onnx.ModelProto:
    """`fused` with each MultiHeadAttention (and the cache Concat and GQA repeat feeding it) replaced by
    a com.microsoft GroupQueryAttention over past K/V inputs and the new tokens' K/V, returning present
    K/V, as onnxruntime's model builder writes it: seqlens_k and total_sequence_length computed from
    attention_mask, rotary left to the graph's RotaryEmbedding at position_ids (do_rotary=0)."""
    model = ir.from_proto(fused)
    graph, tape = model.graph, Tape(model.graph)
    mask = next(v for v in graph.inputs if v.name == "attention_mask")

    def const(array) -> ir.Value:
        return tape.op("Constant", [], {"value": ir.tensor(np.asarray(array))})

    real = tape.op("ReduceSum", [mask, const([1])], {"keepdims": 0})
    seqlens = tape.op("Cast", [tape.op("Sub", [real, const(np.int64(1))])], {"to": ir.DataType.INT32})
    total = tape.op("Cast", [tape.op("Squeeze", [tape.op("Shape", [mask], {"start": 1, "end": 2})])],
                    {"to": ir.DataType.INT32})
    outputs = {value.name: value for value in graph.outputs}
    for layer, node in enumerate(n for n in list(graph) if n.op_type == "MultiHeadAttention"):
        presents = [outputs[f"present_{kv}_{layer}"] for kv in "kv"]
        (past_k, new_k), (past_v, new_v) = (list(p.producer().inputs) for p in presents)
        new_k, new_v = (tape.op("Reshape", [tape.op("Transpose", [new], {"perm": [0, 2, 1, 3]}), const([0, 0, -1])])
                        for new in (new_k, new_v))
        out, *new_presents = tape.op_multi_out(
            "GroupQueryAttention", [node.inputs[0], new_k, new_v, past_k, past_v, seqlens, total],
            {"num_heads": HEADS, "kv_num_heads": KV_HEADS, **attributes}, num_outputs=3, domain="com.microsoft")
        ir.convenience.replace_all_uses_with(node.outputs[0], out)
        for old, new in zip(presents, new_presents):
            graph.outputs[graph.outputs.index(old)] = new
            new.name, new.type, new.shape, old.name = old.name, old.type, old.shape, f"{old.name}_unused"
    RemoveUnusedNodesPass()(model)
    graph.sort()
    return ir.to_proto(model)


def test_ragged_plans_attend_through_multihead_attention_bias(graphs, base) -> None:
    """Streaming heads and per-head budgets on the fused graph: MultiHeadAttention takes the per-head mask
    as its attention_bias over the unpacked cache, and each head keeps what torch keeps."""
    from test_onnx_ragged import torch_head_slots

    transforms = [kvpass.StreamingHeads(0.5, recent=16, importance="random", seed=1), kvpass.Evict(per_head=True)]
    pruned = kvpass.onnx.optimize(graphs["MultiHeadAttention"], budget=0.5, transforms=transforms)
    assert fused_ops(pruned) == fused_ops(graphs["MultiHeadAttention"])
    generator = kvpass.onnx.Generator(pruned)
    ids, new = prompt(), 12
    tokens = generator.generate(ids, max_new_tokens=new)
    expected, cache = torch_generate(kvpass.optimize(copy.deepcopy(base), budget=0.5, transforms=transforms), ids, new)
    assert np.array_equal(tokens, expected)
    assert len(generator.packed) == LAYERS  # every site pruned, packed
    for layer, site in generator.packed.items():
        for onnx_heads, torch_heads in zip(site.head_slots(), torch_head_slots(cache.layers[layer].site_cache)):
            assert all(np.array_equal(a, b) for a, b in zip(onnx_heads, torch_heads))


def test_ragged_plans_on_grouped_query_attention_are_refused_by_name(graphs) -> None:
    """GroupQueryAttention masks by lengths (a prefix of the cache per row), which cannot give KV heads
    different tokens: refused, naming the op, not served uniform."""
    with pytest.raises(UnsupportedModelError, match="is a ms_group_query_attention node: kvpass's ONNX ragged cache"):
        kvpass.onnx.optimize(graphs["GroupQueryAttention"], budget=1.0,
                             transforms=[kvpass.StreamingHeads(0.5, importance="random")])
