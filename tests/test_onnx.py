"""kvpass.onnx: finding attention in ONNX graphs, pruned exports, and onnxruntime == torch tokens."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from transformers import LlamaConfig, LlamaForCausalLM

import kvpass
import kvpass.onnx
from kvpass.errors import UnsupportedModelError
from kvpass.methods import Method, get_method
from kvpass.onnx.export import export_onnx
from kvpass.planning import build_plan
from kvpass.runtime.call_arguments import output_cache

HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 4, 2, 16, 2, 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         num_hidden_layers=LAYERS, intermediate_size=128, vocab_size=VOCAB, pad_token_id=0,
                         eos_token_id=None)  # greedy runs of a random model must not stop at a token by chance
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module", params=[18, 23], ids=["opset18", "opset23"])
def exported(request, base, tmp_path_factory) -> tuple[int, onnx.ModelProto]:
    """The unpruned export (budget 1.0) of the tiny Llama at each opset."""
    path = tmp_path_factory.mktemp("onnx") / f"tiny{request.param}.onnx"
    return request.param, export_onnx(base, path, budget=1.0, opset=request.param)


def prompt(length: int = 120, seed: int = 1) -> torch.Tensor:
    """Distinct tokens: a repeated token has the same key norm at every position (RoPE rotates), an exact
    tie that float noise, not the tie rule, would break differently in torch and onnxruntime."""
    return (torch.randperm(VOCAB - 1, generator=torch.Generator().manual_seed(seed))[:length] + 1)[None]


def torch_generate(model, ids: torch.Tensor, new: int):
    """Greedy tokens and the final cache of the torch path."""
    out = model.generate(ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    return out.sequences.numpy(), output_cache(out)


def test_finds_one_site_per_layer(exported) -> None:
    opset, proto = exported
    report = kvpass.onnx.find_attention(proto)
    assert len(report) == LAYERS and not report.unsupported
    assert [s.pattern for s in report] == ["onnx_attention" if opset >= 23 else "eager_softmax_chain"] * LAYERS
    for layer, site in enumerate(report):
        assert (site.layer, site.num_heads, site.num_kv_heads, site.head_dim) == (layer, HEADS, KV_HEADS, HEAD_DIM)
        assert site.reads_cache and site.causal and site.scale == pytest.approx(HEAD_DIM**-0.5)


def test_attention_reads_grouped_heads_from_the_cache_without_repeating_it(exported) -> None:
    """The exporter repeats K/V to the query heads before opset-23 `Attention`; the op reads GQA itself, so
    kvpass feeds it the cache (`Concat(past, new)`) directly. Parity tests below run the result."""
    opset, proto = exported
    produced = {output: node for node in proto.graph.node for output in node.output}
    attention = [node for node in proto.graph.node if node.op_type == "Attention"]
    assert len(attention) == (LAYERS if opset >= 23 else 0)
    assert all(produced[node.input[index]].op_type == "Concat" for node in attention for index in (1, 2))


def test_budget_one_matches_unpruned_torch(exported, base) -> None:
    _, proto = exported
    ids = prompt()
    generator = kvpass.onnx.Generator(proto)
    tokens = generator.generate(ids, max_new_tokens=12)
    assert np.array_equal(tokens, base.generate(ids, max_new_tokens=12, do_sample=False).numpy())
    assert generator.cache[0][0].shape == (1, KV_HEADS, ids.shape[1] + 11, HEAD_DIM)
    with torch.no_grad():
        expected = base(ids).logits.numpy()
    generator.reset(1)
    np.testing.assert_allclose(generator.step(ids.numpy()), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", [None, "knorm", "streaming_llm", "paged"])
def test_half_budget_keeps_what_torch_keeps(exported, base, method) -> None:
    _, proto = exported
    ids, new = prompt(), 20  # past one serving period: the prefill's eviction, appends, one more eviction
    pruned = kvpass.onnx.optimize(proto, budget=0.5, method=method)
    generator = kvpass.onnx.Generator(pruned)
    tokens = generator.generate(ids, max_new_tokens=new)
    twin = kvpass.optimize(copy.deepcopy(base), budget=0.5, method=method, evict_every=kvpass.onnx.SERVING_EVICT_EVERY)
    expected, cache = torch_generate(twin, ids, new)
    assert np.array_equal(tokens, expected)
    assert_same_cache(generator, cache, ids.shape[1] + new - 1)


def assert_same_cache(generator, cache, length: int) -> None:
    """Every layer of the onnxruntime cache holds what the torch cache holds (same slots, same keys),
    and less than half of `length` tokens."""
    for layer in range(LAYERS):
        keys, values, slots = generator.cache[layer]
        site_cache = cache.layers[layer].site_cache
        assert keys.shape == tuple(site_cache.keys.shape) == values.shape
        assert keys.shape[2] < length * 0.5  # really shrunk, state bytes included
        np.testing.assert_array_equal(slots, site_cache.slots.numpy())
        np.testing.assert_allclose(keys, site_cache.keys.numpy(), atol=1e-5, rtol=0)


def padded_batch(lengths=(120, 90, 100)) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows of distinct tokens (pad id 0) and their attention mask."""
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:], mask[row, width - length:] = prompt(length, seed=row + 1)[0], 1
    return ids, mask


EVERY_METHOD = [None, "tova", "knorm", "streaming_llm", "h2o", "snapkv", "random", "paged",
                get_method("knorm", span=2), get_method("h2o", page_size=4), get_method("random", seed=7),
                get_method("snapkv", window=8, kernel=3), get_method("paged", page_size=8), "paged_tova"]


@pytest.mark.parametrize("method", EVERY_METHOD, ids=repr)
def test_padded_batch_keeps_what_torch_keeps(exported, base, method) -> None:
    """Batch 3, left padding, every method: each row keeps the slots the torch path keeps for it,
    padding first out, under the byte cap (h2o's and snapkv's running sums, carried by the graph, included).
    Every step evicts (`evict_every=1`), so every decode step runs the graph's eviction branch."""
    _, proto = exported
    (ids, mask), new = padded_batch(), 12
    generator = kvpass.onnx.Generator(kvpass.onnx.optimize(proto, budget=0.5, method=method, evict_every=1))
    tokens = generator.generate(ids, max_new_tokens=new, attention_mask=mask)
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5, method=method, evict_every=1)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    assert np.array_equal(tokens, out.sequences.numpy())
    assert_same_cache(generator, output_cache(out), ids.shape[1] + new - 1)
    assert (generator.cache[0][2] >= 0).all()  # padding went first
    for layer, stat in generator.stats.items():
        np.testing.assert_allclose(stat, output_cache(out).layers[layer].site_cache.stat.numpy(), atol=1e-5)
    assert bool(generator.stats) == get_method(method).stat.carried
    assert generator.cache_bytes() <= 0.5 * generator.full_cache_bytes()


def test_padded_batch_at_budget_one_matches_unpruned_torch(exported, base) -> None:
    _, proto = exported
    ids, mask = padded_batch()
    tokens = kvpass.onnx.Generator(proto).generate(ids, max_new_tokens=8, attention_mask=torch.as_tensor(mask))
    assert np.array_equal(tokens, base.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False).numpy())


@pytest.mark.parametrize("method", [None, "knorm", "h2o"])
def test_evict_every_keeps_what_torch_keeps_and_appends_in_between(exported, base, method) -> None:
    """A left-padded batch evicting every 8 steps: the torch path's slots, and in between the graph only
    appends (h2o's running sums grow on those steps too) while the byte cap holds at every step."""
    _, proto = exported
    (ids, mask), new, every = padded_batch(), 20, 8
    generator = kvpass.onnx.Generator(kvpass.onnx.optimize(proto, budget=0.5, method=method, evict_every=every))
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5, method=method, evict_every=every)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    expected, cache = out.sequences.numpy(), output_cache(out)
    assert np.array_equal(generator.generate(ids, max_new_tokens=new, attention_mask=mask), expected)
    for layer in range(LAYERS):
        keys, _, slots = generator.cache[layer]
        assert keys.shape == tuple(cache.layers[layer].site_cache.keys.shape)
        np.testing.assert_array_equal(slots, cache.layers[layer].site_cache.slots.numpy())
    schedule, lengths = generator.schedules[0], []
    generator.reset(len(ids))
    for start in range(ids.shape[1], expected.shape[1]):  # the same tokens again, one step at a time
        if start == ids.shape[1]:
            generator.step(expected[:, :start], mask.numpy())
        else:
            generator.step(expected[:, start - 1:start])
        lengths.append(generator.cache[0][0].shape[2])
        assert lengths[-1] <= schedule.cap(generator.seen)  # the byte cap holds at every step
        assert generator.cache_bytes() <= 0.5 * generator.full_cache_bytes()
    evictions = sum(after <= before for before, after in zip(lengths, lengths[1:]))
    assert 0 < evictions <= (new - 1) // every + 1  # in between, the cache only grows


def test_layers_of_different_budgets_keep_what_torch_keeps(exported, base) -> None:
    """The exported graph builds one mask for every layer from `attention_mask`, which cannot fit layers
    of different lengths (onnxruntime once failed in an Expand node, then kvpass refused such plans):
    a pyramid plan now gets packed caches, each site masking by its own slots, and keeps torch's tokens."""
    from test_onnx_ragged import torch_head_slots

    _, proto = exported
    (ids, mask), new = padded_batch(), 12
    transforms = [kvpass.Evict("knorm", allocation="pyramid", evict_every=4)]
    generator = kvpass.onnx.Generator(kvpass.onnx.optimize(proto, budget=0.5, transforms=transforms))
    tokens = generator.generate(ids, max_new_tokens=new, attention_mask=mask)
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5, transforms=transforms)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    assert np.array_equal(tokens, out.sequences.numpy())
    lengths = {layer: site.lengths[0, 0] for layer, site in generator.packed.items()}
    assert len(generator.packed) == LAYERS and len(set(lengths.values())) == LAYERS  # layers of different lengths
    for layer, site in generator.packed.items():
        expected = torch_head_slots(output_cache(out).layers[layer].site_cache)
        for onnx_heads, torch_heads in zip(site.head_slots(), expected):
            assert all(np.array_equal(a, b) for a, b in zip(onnx_heads, torch_heads))


@pytest.mark.parametrize("method", [get_method("tova", span=2), get_method("knorm", shared_keep_set=True),
                                    get_method("paged", page_size=4), get_method("streaming_llm"),
                                    get_method("random", seed=3), get_method("snapkv", window=4),
                                    get_method("h2o", span=1)], ids=repr)
def test_onnx_ranking_is_the_torch_ranking(method) -> None:
    """The ONNX eviction ranks with the torch ranking function itself, exported: same scores,
    carve-outs and padding, for any batch, heads and length."""
    import onnx_ir as ir

    from kvpass.methods import Observation
    from kvpass.methods.selection import ranking_scores
    from kvpass.rewrites.onnx_scoring import INPUTS, ranking_function

    function = ranking_function(method, ir.DataType.FLOAT, 18)
    caller = helper.make_graph(
        [helper.make_node(function.name, list(INPUTS), ["scores"], domain=function.domain)], "call",
        [helper.make_tensor_value_info(n, TensorProto.INT32 if n in ("slots", "seen", "sinks", "recent")
                                       else TensorProto.FLOAT, None) for n in INPUTS],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)])
    model = helper.make_model(caller, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(function.domain, 1)],
                              functions=[ir.to_proto(function)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    for batch, heads, length in [(1, 2, 40), (3, 1, 7), (2, 4, 129)]:
        slots = torch.sort(torch.randperm(3 * length, generator=generator)[:length]).values.to(torch.int32)
        slots = slots.expand(batch, heads, length).clone()
        slots[0, :, :2] = -1 - slots[0, :, :2]  # left padding in the first row
        inputs = (torch.randn(batch, heads, length, 8, generator=generator),
                  torch.randn(batch, heads, length, 8, generator=generator), slots,
                  torch.rand(batch, heads, length, generator=generator),
                  torch.tensor(3 * length, dtype=torch.int32), torch.tensor(4, dtype=torch.int32),
                  torch.tensor(6, dtype=torch.int32))
        expected = ranking_scores(method, Observation(*inputs[:4], int(inputs[4]), 1), int(inputs[5]), int(inputs[6]))
        (actual,) = session.run(None, {name: value.numpy() for name, value in zip(INPUTS, inputs)})
        np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_export_of_an_optimized_model_uses_its_plan(base, tmp_path) -> None:
    model = kvpass.optimize(copy.deepcopy(base), budget=0.3, method="knorm", recent=8)
    pruned = export_onnx(model, tmp_path / "opt.onnx", opset=23)
    meta = json.loads({p.key: p.value for p in pruned.metadata_props}["kvpass"])
    assert meta["method"] == "knorm"
    assert [s["schedule"]["fraction"] for s in meta["sites"]] == [0.3] * LAYERS
    assert {s["schedule"]["recent"] for s in meta["sites"]} == {8}
    ids = prompt(80, seed=3)
    tokens = kvpass.onnx.Generator(tmp_path / "opt.onnx").generate(ids, max_new_tokens=8)
    assert np.array_equal(tokens, model.generate(ids, max_new_tokens=8, do_sample=False).numpy())  # still bound


def test_pruned_model_is_valid_and_loads_fully_optimized(exported) -> None:
    _, proto = exported
    pruned = kvpass.onnx.optimize(proto, budget=0.5)
    onnx.checker.check_model(pruned, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(pruned.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    assert {"kvpass_evict", "kvpass_past_slots_0", "kvpass_past_slots_1", "position_ids"} <= names
    dims = {o.name: o.shape for o in session.get_outputs()}
    assert dims["kvpass_evicted_key_0"][0] == "batch" and dims["kvpass_evicted_key_0"][1:] == [KV_HEADS, "kept_0", HEAD_DIM]
    assert dims["present_k_0"][2] != "kept_0"  # the uncompacted cache, which steps that only append hand on


def _contrib_attention_model() -> onnx.ModelProto:
    """Two com.microsoft MultiHeadAttention nodes and one GroupQueryAttention, as ORT's fusions write them."""
    hidden = HEADS * HEAD_DIM
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])
    nodes = [
        helper.make_node("MultiHeadAttention", ["x", "x", "x"], ["h0"], domain="com.microsoft", num_heads=HEADS),
        helper.make_node("MultiHeadAttention", ["h0", "h0", "h0"], ["h1"], domain="com.microsoft", num_heads=HEADS),
        helper.make_node("GroupQueryAttention", ["h1", "x", "x", "", "", "seqlens", "total"], ["y", "pk", "pv"],
                         domain="com.microsoft", num_heads=HEADS, kv_num_heads=HEADS),
    ]
    graph = helper.make_graph(
        nodes, "contrib", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        initializer=[helper.make_tensor("seqlens", TensorProto.INT32, [1], [4]),
                     helper.make_tensor("total", TensorProto.INT32, [], [5])],
        value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", hidden]) for n in ("h0", "h1")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def test_finds_com_microsoft_attention_and_refuses_what_it_cannot_prune() -> None:
    model = _contrib_attention_model()
    report = kvpass.onnx.find_attention(model)
    assert [s.pattern for s in report] == ["ms_multihead_attention"] * 2 + ["ms_group_query_attention"]
    assert [s.head_dim for s in report] == [HEAD_DIM] * 3
    with pytest.raises(UnsupportedModelError, match=r"GroupQueryAttention node 'attention_2': its lengths \['seqlens', 'total'\] are fed"):
        kvpass.onnx.optimize(model)
    del model.graph.node[2:]
    model.graph.output[0].name = "h1"
    with pytest.raises(UnsupportedModelError, match=r"\['attention_0', 'attention_1'\] do not read a KV cache"):
        kvpass.onnx.optimize(model)


def _cached_attention_model(opset: int) -> onnx.ModelProto:
    """A hand-written decomposed attention over Concat(past, new): the smallest rewritable site."""
    def info(name, *shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
    nodes = [
        helper.make_node("Concat", ["past_k", "k"], ["present_k"], axis=2),
        helper.make_node("Concat", ["past_v", "v"], ["present_v"], axis=2),
        helper.make_node("Transpose", ["present_k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Div", ["scores", "root"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "present_v"], ["out"]),
    ]
    shape = ("b", 2, "s", 8)
    graph = helper.make_graph(
        nodes, "cached", [info(n, *shape) for n in ("q", "k", "v")] + [info(n, "b", 2, "p", 8) for n in ("past_k", "past_v")],
        [info("out", *shape), info("present_k", "b", 2, "t", 8), info("present_v", "b", 2, "t", 8)],
        initializer=[helper.make_tensor("root", TensorProto.FLOAT, [], [8**0.5])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_hand_written_chain_is_found_with_its_scale() -> None:
    (site,) = kvpass.onnx.find_attention(_cached_attention_model(18))
    assert (site.pattern, site.num_heads, site.num_kv_heads, site.reads_cache) == ("eager_softmax_chain", 2, 2, True)
    assert site.scale == pytest.approx(8**-0.5)


@dataclass
class HostScored(Method):
    """A method whose score branches in Python on the cache's values, so it has no ONNX form."""

    name = "host_scored"

    def score(self, obs):
        return obs.keys.norm(dim=-1) if float(obs.keys.sum()) > 0 else -obs.keys.norm(dim=-1)


def test_bad_inputs_name_the_problem(tmp_path, exported) -> None:
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        kvpass.onnx.optimize(tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        kvpass.onnx.find_attention(tmp_path / "garbage.onnx")
    broken = _cached_attention_model(18)
    broken.graph.node[3].input[0] = "undefined_tensor"
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        kvpass.onnx.optimize(broken)
    no_attention = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UnsupportedModelError, match="no attention found"):
        kvpass.onnx.optimize(no_attention)
    with pytest.raises(UnsupportedModelError, match="opset 17"):
        kvpass.onnx.optimize(_cached_attention_model(17))
    with pytest.raises(UnsupportedModelError, match="position_ids"):
        kvpass.onnx.optimize(_cached_attention_model(18))
    _, proto = exported
    with pytest.raises(UnsupportedModelError, match="method 'host_scored' has no ONNX scoring"):
        kvpass.onnx.optimize(proto, method=HostScored())
    with pytest.raises(ValueError, match="budget"):
        kvpass.onnx.optimize(proto, budget=1.5)
    for every in (0, 2.5, True):
        with pytest.raises(ValueError, match="evict_every"):
            kvpass.onnx.optimize(proto, evict_every=every)
    moving = build_plan(kvpass.onnx.find_attention(proto), 0.5, get_method(None), reallocate=4)
    with pytest.raises(ValueError, match="plan.reallocate=4: re-allocation while decoding runs in the torch runtime"):
        kvpass.onnx.optimize(proto, plan=moving)
    with pytest.raises(ValueError, match="no kvpass metadata"):
        kvpass.onnx.Generator(no_attention)
    older = kvpass.onnx.optimize(proto, budget=0.5)
    entry = next(p for p in older.metadata_props if p.key == "kvpass")
    meta = json.loads(entry.value)
    for site in meta["sites"]:
        del site["evicted_key"], site["evicted_value"]
    entry.value = json.dumps(meta)
    with pytest.raises(ValueError, match=r"path_or_model: the pruned sites .* older kvpass's rewrite"):
        kvpass.onnx.Generator(older)
    generator = kvpass.onnx.Generator(proto)
    for mask, reason in [([[1, 1, 0, 1]] * 2, "only left padding"), ([[0, 0, 0, 0], [1] * 4], "ends in padding"),
                         ([[1, 1, 1]] * 2, "shape"), ([[2, 1, 1, 1]] * 2, "0/1")]:
        with pytest.raises(ValueError, match=f"attention_mask.*{reason}|{reason}.*attention_mask"):
            generator.generate(np.ones((2, 4), np.int64), 2, attention_mask=np.array(mask))


@pytest.mark.parametrize("available, chosen", [
    (["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["CUDAExecutionProvider", "CPUExecutionProvider"]),
])
def test_generator_picks_cuda_when_onnxruntime_has_it(exported, monkeypatch, available, chosen) -> None:
    _, proto = exported
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    generator = kvpass.onnx.Generator(proto)
    assert generator.providers == chosen
    assert generator.session.get_providers()[-1] == "CPUExecutionProvider"  # what this CPU build could take
    assert kvpass.onnx.Generator(proto, providers=["CPUExecutionProvider"]).providers == ["CPUExecutionProvider"]


@pytest.fixture
def one_thread():
    """torch and onnxruntime on one thread each: with the cores shared, oversubscribed threads made
    the SmolLM2 test several times slower (a 1K-token torch prefill: 12 s instead of 4)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    yield options
    torch.set_num_threads(before)


@pytest.mark.slow
def test_smollm2_onnx_tokens_match_torch(tmp_path, one_thread) -> None:
    """A left-padded batch of 3 (640, 560 and 480 tokens of varied prose), tova and h2o (whose running
    sums the graph carries) at the serving default `evict_every`, 32 steps (two eviction periods): the
    torch path's tokens, slots and sums. About 4 minutes, most of it torch.onnx.export of 30 layers, done
    once: both methods prune the one exported graph. Not the default, paged_tova: its quantile ranks turn
    the runtimes' float differences into whole-rank steps, and on this batch onnxruntime keeps another
    page than torch in a padded row (its tokens matched); slot-for-slot equality of paged_tova is checked
    on the tiny model (`test_padded_batch_keeps_what_torch_keeps`)."""
    from kvpass.eval.corpus import text
    from kvpass.eval.models import load_smollm2

    model, tokenizer = load_smollm2()
    corpus = tokenizer(text("dev"), return_tensors="pt").input_ids[0]
    lengths, width = (640, 560, 480), 640
    ids, mask = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:], mask[row, width - length:] = corpus[row * width: row * width + length], 1
    full = export_onnx(model, tmp_path / "full.onnx", budget=1.0)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False).numpy()
    served = kvpass.onnx.Generator(full, session_options=one_thread).generate(ids, 32, attention_mask=mask)
    assert np.array_equal(served, expected)
    for method in ("tova", "h2o"):
        generator = kvpass.onnx.Generator(kvpass.onnx.optimize(full, budget=0.5, method=method),
                                          session_options=one_thread)
        tokens = generator.generate(ids, 32, attention_mask=mask)
        twin = kvpass.optimize(model, budget=0.5, method=method, evict_every=kvpass.onnx.SERVING_EVICT_EVERY)
        out = twin.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, return_dict_in_generate=True)
        assert np.array_equal(tokens, out.sequences.numpy()), method
        for layer in (0, 29):
            site_cache = output_cache(out).layers[layer].site_cache
            assert generator.cache[layer][0].shape == tuple(site_cache.keys.shape)
            np.testing.assert_array_equal(generator.cache[layer][2], site_cache.slots.numpy())
            if method == "h2o":
                np.testing.assert_allclose(generator.stats[layer], site_cache.stat.numpy(), rtol=1e-5, atol=1e-5)
        assert generator.cache_bytes() <= 0.5 * generator.full_cache_bytes()
