"""kvpass.onnx over graphs fused for onnxruntime: com.microsoft MultiHeadAttention rewritten, the other
fused attention ops refused by name."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from test_onnx import HEAD_DIM, KV_HEADS, LAYERS, assert_same_cache, padded_batch, prompt, tiny_llama, torch_generate

import kvpass
import kvpass.onnx
from kvpass.errors import UnsupportedModelError
from kvpass.onnx.export import export_onnx

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


def test_budget_one_is_the_unpruned_fused_run(fused, base) -> None:
    """Budget 1.0 adds no eviction: the logits are the fused graph's own, bit for bit, and the tokens torch's."""
    ids = prompt()
    generator = kvpass.onnx.Generator(kvpass.onnx.optimize(fused, budget=1.0))
    generator.reset(1)
    logits = generator.step(ids.numpy())
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()),
             "position_ids": np.arange(ids.shape[1])[None]}
    feeds.update({f"past_{kv}_{layer}": np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)
                  for layer in range(LAYERS) for kv in "kv"})
    own = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_array_equal(logits, own)
    tokens = generator.generate(ids, max_new_tokens=12)
    assert np.array_equal(tokens, base.generate(ids, max_new_tokens=12, do_sample=False).numpy())


@pytest.mark.parametrize("method", [None, "knorm", "h2o"])
def test_half_budget_keeps_what_torch_keeps_through_the_fused_op(fused, base, method) -> None:
    """The pruned graph still attends with MultiHeadAttention, over the compacted cache; its companion
    scoring keeps the torch path's tokens (tova's and h2o's attention, knorm's norms), under the byte cap
    at every step."""
    ids, new = prompt(), 12
    pruned = kvpass.onnx.optimize(fused, budget=0.5, method=method)
    assert fused_ops(pruned) == fused_ops(fused)
    generator = kvpass.onnx.Generator(pruned)
    generator.reset(1)
    tokens, chunk = [ids.numpy()], ids.numpy()
    for _ in range(new):
        chunk = generator.step(chunk)[:, -1:].argmax(-1)
        tokens.append(chunk)
        assert generator.cache_bytes() <= 0.5 * generator.full_cache_bytes()
    expected, cache = torch_generate(kvpass.optimize(copy.deepcopy(base), budget=0.5, method=method), ids, new)
    assert np.array_equal(np.concatenate(tokens, axis=1), expected)
    assert_same_cache(generator, cache, ids.shape[1] + new - 1)


def test_padded_batch_through_the_fused_op(fused, base) -> None:
    (ids, mask), new = padded_batch(), 8
    generator = kvpass.onnx.Generator(kvpass.onnx.optimize(fused, budget=0.5))
    tokens = generator.generate(ids, max_new_tokens=new, attention_mask=mask)
    out = kvpass.optimize(copy.deepcopy(base), budget=0.5).generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    assert np.array_equal(tokens, out.sequences.numpy())
    assert_same_cache(generator, out.past_key_values, ids.shape[1] + new - 1)


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
