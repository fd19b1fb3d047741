"""Transforms: structural head pruning (exact against its oracle), composition with eviction under
one byte cap, the plan that records both, and the extension point for transforms kvpass does not ship."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvpass
from kvpass.errors import UnsupportedModelError
from kvpass.planning import Plan
from kvpass.testing import assert_cache_within
from kvpass.transforms import Backend, Phase, PlanningContext, Transform, register, remove_planned_heads
from kvpass.runtime.call_arguments import cache_argument
from test_find_attention import CachedDecoder, decode_step_inputs

VOCAB = 128


def tiny(family: str) -> torch.nn.Module:
    """Tiny random decoders: separate Q/K/V with and without biases, MHA, fused QKV (Linear and Conv1D)."""
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB, pad_token_id=0)
    configs = {
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_attention_heads=4, num_key_value_heads=2, **common)),
        "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            num_attention_heads=4, num_key_value_heads=2, **common)),
        "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
            num_attention_heads=8, num_key_value_heads=4, sliding_window=None, **common)),
        "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
            num_attention_heads=4, num_key_value_heads=2, **common)),
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=0)),
    }
    return configs[family]().eval()


O_PROJECTION = {"llama": ("model.layers.{}.self_attn.o_proj", 1), "qwen2": ("model.layers.{}.self_attn.o_proj", 1),
                "mistral": ("model.layers.{}.self_attn.o_proj", 1), "phi3": ("model.layers.{}.self_attn.o_proj", 1),
                "gpt2": ("transformer.h.{}.attn.c_proj", 0)}
"""The oracle's view of each family: where the output projection is and which weight axis its inputs run along."""


def zeroed_oracle(base: torch.nn.Module, family: str, plan: Plan) -> torch.nn.Module:
    """The unmodified model with the removed KV groups' output-projection input columns zeroed."""
    oracle = copy.deepcopy(base)
    path, axis = O_PROJECTION[family]
    for site in plan.sites:
        width = site.group_size * site.head_dim
        weight = oracle.get_submodule(path.format(site.layer)).weight
        with torch.no_grad():
            for head in plan.pruned_heads.get(site.name, []):
                weight.narrow(axis, head * width, width).zero_()
    return oracle


def prompt(length: int = 40, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor, steps: int):
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_output_error_removes_the_heads_the_model_output_does_not_need(family) -> None:
    """A KV group whose output columns are already zero changes nothing when removed: the
    calibrated ranking must name it first, whatever its attention looks like."""
    base = tiny(family)
    path, axis = O_PROJECTION[family]
    sites = kvpass.find_attention(base)
    site = sites[1]
    width = site.group_size * site.head_dim
    with torch.no_grad():
        base.get_submodule(path.format(site.layer)).weight.narrow(axis, width, width).zero_()
    total = sum(s.num_kv_heads for s in sites)
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0,
                            transforms=[kvpass.PruneHeads(1 / total, importance="output_error")])
    assert model.kvpass_plan.pruned_heads == {site.name: [1]}
    errors = model.kvpass_plan.head_importance
    assert errors[site.name][1] == 0.0 and min(v for e in errors.values() for v in e if v) > 0


@pytest.mark.parametrize("family", sorted(O_PROJECTION))
@pytest.mark.parametrize("importance", ["output_error", "random"])
def test_head_pruning_equals_zeroed_output_columns(family, importance) -> None:
    base = tiny(family)
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0,
                            transforms=[kvpass.PruneHeads(0.25, importance=importance), kvpass.Evict()])
    plan = model.kvpass_plan
    assert sum(map(len, plan.pruned_heads.values())) == sum(s.num_kv_heads for s in plan.sites) // 4
    oracle = zeroed_oracle(base, family, plan)
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, oracle(ids).logits, rtol=0, atol=1e-5)
    tokens, logits = greedy(model, ids, 32)
    expected_tokens, expected_logits = greedy(oracle, ids, 32)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)


def test_weights_and_cache_shrink_by_the_arithmetic() -> None:
    base = tiny("qwen2")  # q/k/v biases, GQA group of 2
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0, transforms=[kvpass.PruneHeads(0.5, importance="random")])
    plan = model.kvpass_plan
    removed = sum(map(len, plan.pruned_heads.values()))
    assert removed == 2 and all(len(h) == 1 for h in plan.pruned_heads.values())  # every layer keeps one
    hidden, head_dim, group = 64, 16, 2
    per_kv_head = (group * head_dim * (hidden + 1)        # q rows and bias
                   + 2 * head_dim * (hidden + 1)          # k and v rows and biases
                   + hidden * group * head_dim)           # o input columns
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(base) - count(model) == removed * per_kv_head == model.kvpass_heads_removed
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (32, 64) and attention.q_proj.out_features == 32
    assert attention.o_proj.weight.shape == (64, 32) and attention.o_proj.in_features == 32
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt(50), **cache_argument(model, cache), use_cache=True)
    assert [layer.keys.shape[1] for layer in cache.layers] == [1, 1]
    assert kvpass.cache_bytes(cache) == 2 * (2 * 1 * 50 * head_dim * 4)  # half the unpruned cache
    figures = kvpass.stats(model)
    assert figures["kv_bytes"] * 2 == figures["full_kv_bytes"]
    assert figures["PruneHeads"]["kv_heads_removed"] == 2


@settings(max_examples=8, deadline=None)
@given(budget=st.floats(0.15, 0.7), evict_every=st.integers(1, 4))
def test_head_pruning_and_eviction_share_one_byte_cap(budget, evict_every) -> None:
    transforms = [kvpass.Evict(sinks=2, recent=6, evict_every=evict_every),
                  kvpass.PruneHeads(0.25, importance="random")]
    assert_cache_within(tiny("llama"), budget, prompt_len=64, steps=10, prompt=prompt(64), transforms=transforms)


def test_budget_the_transforms_cannot_meet_is_refused() -> None:
    base = tiny("llama")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="keep 0.750 of the KV-cache bytes.*Evict"):
        kvpass.optimize(model, budget=0.5, transforms=[kvpass.PruneHeads(0.25, importance="random")])
    with pytest.raises(ValueError, match="absolute cap.*Evict"):
        kvpass.optimize(model, budget="100 tokens", transforms=[kvpass.PruneHeads(0.25, importance="random")])
    assert _same_weights(model, base) and not hasattr(model, "kvpass_plan")
    pruned = kvpass.optimize(copy.deepcopy(base), budget=0.75, transforms=[kvpass.PruneHeads(0.25, importance="random")])
    assert pruned.kvpass_plan.method is None  # the removed heads alone meet the budget: nothing evicts


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.2", True])
def test_bad_fraction_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="fraction"):
        kvpass.PruneHeads(bad)


def test_bad_options_and_misuse_are_refused_with_the_model_unchanged() -> None:
    base = tiny("llama")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="importance"):
        kvpass.PruneHeads(0.2, importance="magnitude")
    with pytest.raises(ValueError, match="every layer keeps one"):  # 3 of 4 KV heads with 2 layers of 2
        kvpass.optimize(model, budget=1.0, transforms=[kvpass.PruneHeads(0.75, importance="random")])
    with pytest.raises(TypeError, match="options of kvpass.Evict"):
        kvpass.optimize(model, method="h2o", transforms=[kvpass.Evict()])
    with pytest.raises(ValueError, match="more than once"):
        kvpass.optimize(model, transforms=[kvpass.Evict(), kvpass.Evict("h2o")])
    with pytest.raises(TypeError, match="list of kvpass transforms"):
        kvpass.optimize(model, transforms=kvpass.Evict())
    assert _same_weights(model, base) and not hasattr(model, "kvpass_plan")
    once = kvpass.optimize(copy.deepcopy(base), budget=1.0, transforms=[kvpass.PruneHeads(0.25, importance="random")])
    with pytest.raises(UnsupportedModelError, match="already removed"):
        kvpass.optimize(once, budget=1.0, transforms=[kvpass.PruneHeads(0.25, importance="random")])


def test_projections_not_found_is_a_clear_error() -> None:
    """nn.MultiheadAttention packs Q/K/V into one in-projection weight read through F.linear slices:
    no projection anchors, so PruneHeads names what is missing."""
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Encoder().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match="needs the projections"):
        kvpass.optimize(model, budget=1.0, example_inputs=(torch.randn(1, 6, 32),),
                        transforms=[kvpass.PruneHeads(0.5, importance="random")])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_encoder_without_cache_takes_head_pruning_at_budget_one() -> None:
    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB)).eval()
    ids = prompt(12)
    with pytest.raises(ValueError, match="keeps no KV cache"):
        kvpass.optimize(copy.deepcopy(base), budget=0.5, transforms=[kvpass.PruneHeads(0.5, importance="random")])
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0, example_inputs=(ids,),
                            transforms=[kvpass.PruneHeads(0.5, importance="random")])
    oracle = copy.deepcopy(base)
    for site in model.kvpass_plan.sites:
        weight = oracle.encoder.layer[site.layer].attention.output.dense.weight
        with torch.no_grad():
            for head in model.kvpass_plan.pruned_heads.get(site.name, []):
                weight[:, head * 16:(head + 1) * 16] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, oracle(ids).last_hidden_state, rtol=0, atol=1e-5)
    assert model.encoder.layer[0].attention.self.query.weight.shape[0] < 64


def test_explicit_cache_model_takes_head_pruning_and_eviction() -> None:
    model, inputs = CachedDecoder().eval(), decode_step_inputs(past_len=40)
    rewritten = kvpass.optimize(model, budget=0.3, example_inputs=inputs, transforms=[
        kvpass.PruneHeads(0.25, importance="random"), kvpass.Evict("knorm", sinks=2, recent=4)])
    removed = rewritten.kvpass_plan.pruned_heads
    assert sum(map(len, removed.values())) == 1
    layer = int(next(iter(removed))[len("layers."):])
    past_k, past_v = list(inputs[2]), list(inputs[3])
    keep = [h for h in range(2) if h not in next(iter(removed.values()))]
    past_k[layer], past_v[layer] = past_k[layer][:, keep], past_v[layer][:, keep]
    with torch.no_grad():
        _, keys, values = rewritten(inputs[0], inputs[1], tuple(past_k), tuple(past_v))
    assert keys[layer].shape[1] == 1 and keys[1 - layer].shape[1] == 2
    assert kvpass.cache_bytes((keys, values)) <= 0.3 * 2 * 2 * 2 * 41 * 8 * 4


def test_plan_with_removed_heads_round_trips_and_applies(tmp_path) -> None:
    base = tiny("llama")
    plan = kvpass.plan(base, budget=0.4, transforms=[kvpass.PruneHeads(0.25), kvpass.Evict(allocation="uniform")])
    assert plan.pruned_heads and plan.head_importance
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    first = kvpass.optimize(copy.deepcopy(base), plan=loaded)
    second = kvpass.optimize(copy.deepcopy(base), budget=0.4, transforms=[kvpass.Evict(), kvpass.PruneHeads(0.25)])
    assert [t["name"] for t in second.kvpass_plan.transforms] == ["Evict", "PruneHeads"]  # as given; planned by phase
    ids = prompt(60)
    with torch.no_grad():
        torch.testing.assert_close(first(ids).logits, second(ids).logits)
    assert first.kvpass_plan.pruned_heads == second.kvpass_plan.pruned_heads


def test_optimize_without_transforms_is_evict_with_the_method() -> None:
    base = tiny("llama")
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5, method="h2o", sinks=2)
    assert model.kvpass_plan.transforms == [kvpass.Evict("h2o", sinks=2).record()]
    assert model.kvpass_plan.method == kvpass.get_method("h2o")


# --- the extension point: a transform defined outside kvpass ----------------------------------

@dataclass(frozen=True)
class DropLastHead(Transform):
    """Removes the last KV head of every layer (with its query group)."""

    name = "DropLastHead"
    phase = Phase.STRUCTURE
    needs = ("projections",)

    def decide(self, context: PlanningContext) -> None:
        context.pruned_heads.update({site.name: [site.num_kv_heads - 1] for site in context.sites})


register(DropLastHead, Backend.HF)(remove_planned_heads)


def test_a_transform_from_outside_the_package_runs_through_optimize() -> None:
    base = tiny("llama")
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5, transforms=[DropLastHead(), kvpass.Evict()])
    plan = model.kvpass_plan
    assert plan.pruned_heads == {site.name: [1] for site in plan.sites}
    assert all(layer.self_attn.k_proj.weight.shape[0] == 16 for layer in model.model.layers)
    assert plan.method is None or all(b == 1.0 for b in plan.budgets.values())  # half the heads meet budget 0.5
    oracle = zeroed_oracle(base, "llama", plan)
    ids = prompt()
    tokens, logits = greedy(model, ids, 32)
    expected_tokens, expected_logits = greedy(oracle, ids, 32)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    assert kvpass.stats(model)["DropLastHead"] == {}


def test_export_of_a_head_pruned_model_is_smaller_and_matches_torch(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    base = tiny("llama")
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5, transforms=[kvpass.PruneHeads(0.25), kvpass.Evict()])
    full = kvpass.export_onnx(base, tmp_path / "full.onnx", budget=1.0)
    pruned = kvpass.export_onnx(model, tmp_path / "pruned.onnx")
    size = lambda proto: sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)  # noqa: E731
    assert size(pruned) < size(full)
    ids = prompt(50)
    expected = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0).numpy()
    assert (kvpass.onnx.Generator(pruned).generate(ids, max_new_tokens=10) == expected).all()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)
