"""Ragged plans (per-head budgets, streaming heads) exported to ONNX: packed caches that keep, head by
head, what the torch `RaggedKV` keeps, served by onnxruntime."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
from test_onnx import HEAD_DIM, KV_HEADS, padded_batch, prompt, tiny_llama

import kvpass
import kvpass.onnx
from kvpass.runtime.call_arguments import output_cache


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def torch_head_slots(site_cache) -> list[list[np.ndarray]]:
    """[B][Hkv] the slots each (sequence, head) of a torch site cache holds, in cache order."""
    return [[slots.numpy() for slots in heads] for heads in site_cache.head_slots()]


KNORM_SPAN = kvpass.methods.get_method("knorm", span=2)
CASES = {
    "per_head_tova_every4": (0.5, [kvpass.Evict("tova", per_head=True, evict_every=4)], 23, False),
    "per_head_default_padded": (0.5, [kvpass.Evict(per_head=True)], 18, True),
    "per_head_h2o_padded_every3": (0.5, [kvpass.Evict("h2o", per_head=True, evict_every=3)], 23, True),
    "per_head_knorm_span": (0.4, [kvpass.Evict(KNORM_SPAN, per_head=True)], 23, False),
    "per_head_calibrated_padded": (0.4, [kvpass.Evict("tova", per_head=True, head_allocation="calibrated")], 23, True),
    # one streaming head: the other layer's heads keep alike (the uniform rule, packed too)
    "streaming_beside_uniform_snapkv_padded": (0.5, [kvpass.StreamingHeads(0.25, recent=16, importance="random"),
                                                     kvpass.Evict("snapkv")], 23, True),
    # one streaming head at budget 1: the other layer is not pruned (its plain cache)
    "streaming_beside_unpruned": (1.0, [kvpass.StreamingHeads(0.25, sinks=2, recent=16, importance="random",
                                                              seed=3)], 18, False),
    # the padded prefill stays in the tail (evict_every 128): the view ranks it between rows and new tokens
    "streaming_padded_tail_span": (1.0, [kvpass.StreamingHeads(0.5, recent=16, importance="random", seed=1),
                                         kvpass.Evict(KNORM_SPAN, evict_every=128)], 23, True),
    "streaming_and_per_head": (0.5, [kvpass.StreamingHeads(0.25, recent=16, importance="random"),
                                     kvpass.Evict("paged", per_head=True)], 23, True),
    # every head of layer 0 streams: no budgeted head to rank there
    "a_layer_all_streaming": (0.5, [kvpass.StreamingHeads(0.5, recent=16, importance="random", seed=5),
                                    kvpass.Evict(per_head=True)], 23, False),
    # a removed head: the graph has fewer heads, the streaming head is named among those kept
    "pruned_heads_streaming_per_head": (0.5, [kvpass.PruneHeads(0.25, importance="random", seed=2),
                                              kvpass.StreamingHeads(0.34, recent=16, importance="random", seed=0),
                                              kvpass.Evict(per_head=True)], 23, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_keeps_per_head_what_torch_keeps(base, case, tmp_path) -> None:
    """Greedy tokens equal, and every (sequence, KV head) holds the same slots in the same order as the
    torch ragged cache (streaming heads their window; layers without one the uniform rule), at opset
    18 (decomposed softmax chains) and 23 (`Attention` nodes), for padded batches too; the graph's
    bytes never exceed what torch holds."""
    budget, transforms, opset, padded = CASES[case]
    model = kvpass.optimize(copy.deepcopy(base), budget=budget, transforms=transforms)
    generator = kvpass.onnx.Generator(kvpass.export_onnx(model, tmp_path / "ragged.onnx", opset=opset))
    (ids, mask), new = (padded_batch() if padded else (prompt(), None)), 20
    tokens = generator.generate(ids, max_new_tokens=new, attention_mask=mask)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    assert np.array_equal(tokens, out.sequences.numpy())
    cache = output_cache(out)
    assert generator.packed, "a ragged plan's pruned sites carry packed caches"
    for layer, site in generator.packed.items():
        expected = torch_head_slots(cache.layers[layer].site_cache)
        for row, heads in enumerate(site.head_slots()):
            for head, slots in enumerate(heads):
                np.testing.assert_array_equal(slots, expected[row][head], err_msg=f"layer {layer}, {row}, {head}")
    assert_within_caps(generator)


def assert_within_caps(generator) -> None:
    """Every packed site holds at most its byte cap per sequence: the ragged cap, or for a site whose heads
    keep alike the uniform cap plus its lengths (one int32 per head: the uniform layout has none)."""
    batch = len(generator.next_position)
    for site in generator.packed.values():
        if site.heads is not None:
            assert site.nbytes() <= batch * site.heads.byte_cap(generator.seen)
        else:
            per_token = site.schedule.kv_bytes_per_token + site.schedule.state_bytes_per_token
            assert site.nbytes() <= batch * (site.schedule.cap(generator.seen) * per_token + site.lengths.shape[1] * 4)


def test_per_head_budgets_are_ragged_and_packed_in_the_graph(base, tmp_path) -> None:
    """The graph's cache I/O is packed rows plus lengths (no [B, Hkv, T, D] past for a pruned site), and
    per-head eviction really gives heads different lengths; memory is rows x row bytes + lengths."""
    model = kvpass.optimize(copy.deepcopy(base), budget=0.3, transforms=[kvpass.Evict("tova", per_head=True)])
    proto = kvpass.export_onnx(model, tmp_path / "ragged.onnx")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {value.name: value.shape for value in session.get_inputs()}
    assert not any(name.startswith("past_k") for name in inputs)
    assert inputs["kvpass_past_packed_key_0"] == ["rows_0", HEAD_DIM]
    assert inputs["kvpass_past_lengths_0"] == ["batch", KV_HEADS]
    generator = kvpass.onnx.Generator(proto)
    tokens = generator.generate(prompt(), max_new_tokens=6)
    generator.reset(1)
    for length in range(prompt().shape[1], tokens.shape[1]):  # the same tokens again, one step at a time
        generator.step(tokens[:, :length] if generator.seen == 0 else tokens[:, length - 1:length])
        assert_within_caps(generator)
    for site in generator.packed.values():
        assert len(set(site.lengths.reshape(-1).tolist())) > 1  # heads of one layer differ
        assert site.keys.shape == (int(site.lengths.sum()), HEAD_DIM)
        rows = int(site.lengths.sum())
        assert site.nbytes() == rows * (2 * HEAD_DIM * 4 + 4) + site.lengths.nbytes  # tova keeps no statistic
    assert generator.cache_bytes() <= 0.3 * generator.full_cache_bytes()


def test_streaming_heads_on_an_onnx_graph_need_a_torch_plan_or_random_heads(base, tmp_path) -> None:
    proto = kvpass.export_onnx(base, tmp_path / "plain.onnx", budget=1.0)
    with pytest.raises(ValueError, match="importance='output_error'.*calibrates the torch model"):
        kvpass.onnx.optimize(proto, budget=1.0, transforms=[kvpass.StreamingHeads(0.5)])
    with pytest.raises(ValueError, match="head_allocation='calibrated'.*calibrates the torch model"):
        kvpass.onnx.optimize(proto, budget=0.5, transforms=[kvpass.Evict(per_head=True, head_allocation="calibrated")])
    pruned = kvpass.onnx.optimize(proto, budget=1.0, transforms=[kvpass.StreamingHeads(0.5, recent=8,
                                                                                       importance="random")])
    generator = kvpass.onnx.Generator(pruned)
    generator.generate(prompt(), max_new_tokens=2)
    lengths = np.concatenate([site.lengths.reshape(-1) for site in generator.packed.values()])
    assert sorted(lengths.tolist())[:2] == [4 + 8] * 2  # two of the four KV heads stream: sinks + recent
