"""kvpass.optimize end to end on tiny random-weight decoders: exactness, hard caps, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvpass
from kvpass.errors import UnsupportedModelError
from kvpass.testing import assert_identity, assert_oracle
from kvpass.runtime.call_arguments import cache_argument, cache_keyword
from test_find_attention import CachedDecoder, decode_step_inputs

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 16, 2


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         num_hidden_layers=LAYERS, intermediate_size=128, vocab_size=128, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama()


def prompt(length: int = 48, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_kv_bytes(tokens: int, batch: int = 1) -> int:
    return LAYERS * 2 * batch * KV_HEADS * tokens * HEAD_DIM * 4


def prefill(model, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_argument(model, cache), use_cache=True)
    return cache


def test_budget_one_changes_nothing(base) -> None:
    assert_identity(base, budget=1.0, prompt=prompt(), steps=16, atol=1e-5)
    ids = prompt()
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-5)  # every position
    assert kvpass.cache_bytes(prefill(model, ids)) == full_kv_bytes(ids.shape[1])


@pytest.mark.parametrize("method", sorted(kvpass.METHODS))
def test_half_budget_really_shrinks_every_layer(base, method) -> None:
    ids = prompt(length=200)
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5, method=method)
    cache = prefill(model, ids)
    assert cache.get_seq_length() == 200  # logical length survives eviction
    per_layer = full_kv_bytes(200) // LAYERS
    for layer in cache.layers:
        assert layer.keys.shape[-2] < 100 and layer.keys.is_contiguous()
        assert kvpass.cache_bytes(layer.site_cache.tensors()) <= 0.5 * per_layer
    assert kvpass.cache_bytes(cache) <= 0.5 * full_kv_bytes(200)


@settings(max_examples=12, deadline=None)
@given(budget=st.floats(0.1, 0.95), evict_every=st.integers(1, 6), method=st.sampled_from(["h2o", "tova", "paged"]))
def test_cap_holds_while_decoding(base, budget, evict_every, method) -> None:
    model = kvpass.optimize(copy.deepcopy(base), budget=budget, method=method, evict_every=evict_every,
                            sinks=2, recent=8)
    ids = prompt(length=64)
    cache = prefill(model, ids)
    token = ids[:, -1:]
    evictions = []
    for step in range(12):
        seen = 64 + step
        assert kvpass.cache_bytes(cache) <= budget * full_kv_bytes(seen)
        evictions.append(cache.layers[0].site_cache.evictions)
        with torch.no_grad():
            token = model(token, **cache_argument(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
    if evict_every > 1:  # amortised: fewer evictions than steps
        assert evictions[-1] - evictions[0] < 12


def test_streaming_keeps_sinks_and_recent_slots(base) -> None:
    model = kvpass.optimize(copy.deepcopy(base), budget=0.25, method="streaming_llm", sinks=4, recent=8)
    cache = prefill(model, prompt(length=100))
    slots = cache.layers[1].site_cache.slots[0, 0].tolist()
    keep = len(slots)
    assert slots == list(range(4)) + list(range(100 - (keep - 4), 100))


def test_batched_left_padding_and_sampling(base) -> None:
    ids = prompt(length=40, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    alone = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(batched[0], alone[0])  # the unpadded row evicts exactly as alone
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=5)
    assert sampled.shape == (2, 48)
    cache = prefill(model, ids[1:, 9:])
    padded = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_argument(model, padded), use_cache=True)
    assert (padded.layers[0].site_cache.slots[1] >= 9).all()  # padding is evicted first
    assert cache.get_seq_length() == 31


def test_budget_one_with_left_padding_matches_unmodified(base) -> None:
    ids = prompt(length=30, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0)
    expected = base.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), expected)


def test_decode_step_compiles_fullgraph(base) -> None:
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5, sinks=2, recent=4)
    ids = prompt(length=40)
    eager_cache, compiled_cache = prefill(model, ids), prefill(model, ids)
    token = torch.tensor([[3]])
    keyword = cache_keyword(model)  # resolved outside the compiled step
    step = torch.compile(lambda t, c: model(t, **{keyword: c}, use_cache=True).logits, fullgraph=True)
    with torch.no_grad():
        compiled = step(token, compiled_cache)
        eager = model(token, **cache_argument(model, eager_cache), use_cache=True).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert compiled_cache.layers[0].keys.shape == eager_cache.layers[0].keys.shape


def test_decode_step_exports(base) -> None:
    """torch.export of one decode step over a compacted cache: the kvpass ops stay single nodes.

    The step is exported at one cache state (its Python-side lengths are constants of the program)."""
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5, sinks=2, recent=4)
    ids, token = prompt(length=40), torch.tensor([[3]])

    class DecodeStep(torch.nn.Module):
        def __init__(self, cache):
            super().__init__()
            self.cache = cache

        def forward(self, token):
            return model(token, **cache_argument(model, self.cache), use_cache=True).logits

    exported = torch.export.export(DecodeStep(prefill(model, ids)), (token,), strict=False)
    targets = [str(n.target) for n in exported.graph.nodes]
    assert targets.count("kvpass.attention.default") == LAYERS
    with torch.no_grad():
        eager = DecodeStep(prefill(model, ids))(token)
    torch.testing.assert_close(exported.module()(token), eager, rtol=1e-5, atol=1e-5)


def test_kvpass_ops_export() -> None:
    class DecodeStep(torch.nn.Module):
        def forward(self, q, k, v, q_slots, k_slots):
            out, stat = torch.ops.kvpass.attention(q, k, v, q_slots, k_slots, 0.25, True, "last_query", 0)
            k2, v2, slots, _ = torch.ops.kvpass.select_and_compact(k, v, k_slots, stat, 8)
            return out, k2, v2, slots

    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    args = (q, k, v, torch.tensor([[12]], dtype=torch.int32), torch.arange(12, dtype=torch.int32).expand(1, 2, 12))
    exported = torch.export.export(DecodeStep(), args)
    targets = {str(n.target) for n in exported.graph.nodes}
    assert {"kvpass.attention.default", "kvpass.select_and_compact.default"} <= targets
    torch.testing.assert_close(exported.module()(*args)[1], DecodeStep()(*args)[1])


def test_explicit_cache_model_returns_compacted_cache() -> None:
    model, inputs = CachedDecoder().eval(), decode_step_inputs(past_len=40)
    rewritten = kvpass.optimize(model, budget=0.5, method="knorm", example_inputs=inputs, sinks=2, recent=4)
    with torch.no_grad():
        logits, keys, values = rewritten(*inputs)
        reference_logits, reference_keys, _ = model(*inputs)
    torch.testing.assert_close(logits, reference_logits)  # eviction happens after this step's attention
    assert [k.shape[-2] for k in reference_keys] == [41, 41]
    assert all(k.shape[-2] <= math.floor(0.5 * 41) for k in keys + values)
    assert kvpass.cache_bytes((keys, values)) <= 0.5 * kvpass.cache_bytes(reference_keys) * 2


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, float("nan"), 2, True, "half"])
def test_bad_budget_is_refused_and_model_unchanged(base, budget) -> None:
    model = copy.deepcopy(base)
    with pytest.raises((ValueError, TypeError), match="budget"):
        kvpass.optimize(model, budget=budget)
    assert model.config._attn_implementation == base.config._attn_implementation
    assert not hasattr(model, "kvpass_plan")


def test_bad_method_and_options_are_refused(base) -> None:
    with pytest.raises(ValueError, match="method='nope'.*h2o"):
        kvpass.optimize(copy.deepcopy(base), method="nope")
    with pytest.raises(TypeError, match="span"):
        kvpass.optimize(copy.deepcopy(base), method="h2o", spam=3)
    with pytest.raises(ValueError, match="evict_every"):
        kvpass.optimize(copy.deepcopy(base), evict_every=0)


def test_model_without_attention_is_refused() -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with pytest.raises(UnsupportedModelError, match="no attention"):
        kvpass.optimize(mlp, example_inputs=(torch.randn(2, 8),))


def test_untraceable_example_inputs_are_refused(base) -> None:
    with pytest.raises(kvpass.errors.CaptureError, match="example_inputs"):
        kvpass.optimize(copy.deepcopy(base), example_inputs=("not a tensor",))


def test_encoder_without_cache_is_refused() -> None:
    layer = torch.nn.TransformerEncoderLayer(32, 4, batch_first=True).eval()
    with pytest.raises(UnsupportedModelError, match="no KV cache"):
        kvpass.optimize(layer, example_inputs=(torch.randn(1, 6, 32),))


def test_static_caches_are_refused(base) -> None:
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5)
    with pytest.raises(UnsupportedModelError, match="StaticLayer"):
        model.generate(prompt(), max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("method", sorted(kvpass.METHODS))
def test_decode_after_eviction_equals_full_model_with_evicted_tokens_masked(base, method) -> None:
    """Positions survive eviction: RoPE of the new token and of kept keys is unchanged, so attending over
    the compacted cache equals the full model with each layer's (and KV head's) evicted keys masked out."""
    assert_oracle(base, method, budget=0.3, prompt_len=60, steps=4, sinks=4, recent=8)


def test_beam_search_reorders_compacted_cache(base) -> None:
    model = kvpass.optimize(copy.deepcopy(base), budget=0.5)
    out = model.generate(prompt(length=40), max_new_tokens=6, num_beams=3, do_sample=False)
    assert out.shape == (1, 46)
