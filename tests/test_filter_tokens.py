"""Token filtering (kvpass.FilterTokens): identity at ratio 0, exact skipping against an oracle that
zeroes the filtered tokens' attention and hides their keys, the cache holding exactly the kept
tokens, bulk scoring equal to token-by-token scoring, the achieved ratio, the byte cap with
eviction, composition with head pruning and with pruning before the attention (SelectLayer's
token positions), and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvpass
from kvpass.hf_attention import attention_implementation
from kvpass.errors import UnsupportedModelError
from kvpass.kernels import similarity
from kvpass.planning import Plan, SiteSchedule
from kvpass.runtime.compacted_cache import CompactedKV, TokenPositions
from kvpass.runtime.call_arguments import cache_argument
from test_find_attention import CachedDecoder, decode_step_inputs
from test_transforms import VOCAB, greedy, prompt, tiny

FILTERED = 1
"""The layer the exactness tests filter (of tiny models' two)."""
TINY_LLAMA = tiny("llama")
"""Built once for the property tests (each example optimizes a copy)."""


def kept_positions(cache, layer: int) -> torch.Tensor:
    """The logical positions layer `layer` of an optimized model's cache holds (batch row 0, head 0)."""
    site_cache = cache.layers[layer].site_cache
    if site_cache.slots is None:
        return torch.arange(site_cache.keys.shape[-2])
    return site_cache.slots[0, 0].long()


def oracle(base, layer: int, hidden: torch.Tensor, zeroed: torch.Tensor):
    """`base` whose attention at `layer` hides keys and gives the queries in `zeroed` a zero output:
    what filtering promises, written as masks. `hidden` bool [T]: keys no query sees (their own
    included); or int [T]: the first query position that no longer sees each key."""
    model = copy.deepcopy(base)
    hidden_from = torch.where(hidden, 0, len(hidden)) if hidden.dtype == torch.bool else hidden

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        length = key.shape[-2]
        visible = torch.ones(length, length, dtype=torch.bool).tril()
        if module.layer_idx == layer:
            visible &= torch.arange(length)[:, None] < hidden_from[None, :length]
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scaling)
        if module.layer_idx == layer:
            out[:, :, zeroed] = 0
        return out.transpose(1, 2).contiguous(), None

    return model, attend


def decode(model, ids: torch.Tensor, steps: torch.Tensor, cache=None):
    """Prefill `ids`, then feed `steps` one token at a time (teacher forcing); returns (cache, logits per step)."""
    cache = cache if cache is not None else DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        logits.append(model(ids, **cache_argument(model, cache), use_cache=True).logits[:, -1])
        for token in steps.T:
            logits.append(model(token[:, None], **cache_argument(model, cache), use_cache=True).logits[:, -1])
    return cache, torch.stack(logits, 1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ratio_zero_is_the_identity(family) -> None:
    base = tiny(family)
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0, transforms=[kvpass.FilterTokens(0.0), kvpass.Evict()])
    ids = prompt(60)
    tokens, logits = greedy(model, ids, 16)
    expected_tokens, expected_logits = greedy(base, ids, 16)
    assert torch.equal(tokens, expected_tokens) and torch.equal(logits, expected_logits)
    evicting = kvpass.optimize(copy.deepcopy(base), budget=0.5, transforms=[kvpass.FilterTokens(0.0), kvpass.Evict()])
    alone = kvpass.optimize(copy.deepcopy(base), budget=0.5, transforms=[kvpass.Evict()])
    assert evicting.kvpass_plan.budgets == alone.kvpass_plan.budgets
    assert torch.equal(greedy(evicting, ids, 16)[1], greedy(alone, ids, 16)[1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(("fusion", "recent"), [("joint", 4), ("random", 4), ("joint", 0)])
def test_filtered_tokens_skip_attention_exactly(family, fusion, recent) -> None:
    """Prefill and decode against the oracle; the filtered layer's cache holds exactly the kept
    tokens, with the keys and values the unmodified model computes for them. A filtered decode token
    attends and stays visible for `recent` steps, then leaves the cache (`recent=0`: never cached)."""
    base = tiny(family)
    ratio, length, steps = 0.5, 48, 24
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0, transforms=[
        kvpass.FilterTokens(ratio, layers=[FILTERED], warmup=4, recent=recent, fusion=fusion), kvpass.Evict()])
    ids, continuation = prompt(length), prompt(steps, seed=2)
    cache, logits = decode(model, ids, continuation)
    kept = kept_positions(cache, FILTERED)
    total = length + steps
    hidden = torch.ones(total, dtype=torch.bool)
    hidden[kept] = False
    assert int(hidden[:length].sum()) == round(ratio * length)
    assert not hidden[:4].any() and not hidden[length - recent:length].any()
    assert not hidden[total - recent:].any() and 0 < int(hidden[length:].sum()) < steps - recent  # some left
    figures = kvpass.stats(model)["FilterTokens"]["layers"]
    assert list(figures) == [model.kvpass_plan.sites[FILTERED].name]
    assert figures[model.kvpass_plan.sites[FILTERED].name]["filtered"] == int(hidden.sum())
    zeroed = torch.zeros(total, dtype=torch.bool)
    zeroed[:length] = hidden[:length]  # decode steps still attend (over what is cached)
    positions = torch.arange(total)
    hidden_from = torch.where(positions < length, 0, positions + recent + 1 if recent else 0)
    hidden_from = torch.where(hidden, hidden_from, total)
    reference, attend = oracle(base, FILTERED, hidden_from, zeroed)
    everything = torch.cat([ids, continuation], 1)
    with attention_implementation(reference, "filter_oracle", attend), torch.no_grad():
        expected = reference(everything, use_cache=False).logits
    torch.testing.assert_close(logits[:, 0], expected[:, length - 1], rtol=0, atol=2e-5)
    torch.testing.assert_close(logits[:, 1:], expected[:, length:], rtol=0, atol=2e-5)
    full = DynamicCache(config=base.config)
    with torch.no_grad():
        base(everything, **cache_argument(base, full), use_cache=True)
    layer = cache.layers[FILTERED]
    assert layer.keys.shape[-2] == total - int(hidden.sum())
    torch.testing.assert_close(layer.keys, full.layers[FILTERED].keys[:, :, kept], rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.values, full.layers[FILTERED].values[:, :, kept], rtol=0, atol=1e-6)


def test_keeping_keys_and_values_only_skips_queries() -> None:
    base = tiny("llama")
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0, transforms=[
        kvpass.FilterTokens(0.5, layers=[FILTERED], warmup=4, recent=4, drop_kv=False), kvpass.Evict()])
    ids = prompt(40)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(ids, **cache_argument(model, cache), use_cache=True).logits
    assert cache.layers[FILTERED].keys.shape[-2] == 40
    state = cache.layers[FILTERED].site_cache.state["FilterTokens"]
    assert state.filtered == 20
    # which queries were skipped: the ones whose output differs from the unmodified model's
    reference, attend = oracle(base, FILTERED, torch.zeros(40, dtype=torch.bool), torch.zeros(40, dtype=torch.bool))
    with attention_implementation(reference, "filter_oracle", attend), torch.no_grad():
        unfiltered = reference(ids).logits
    skipped = (logits - unfiltered).abs().amax(-1)[0] > 1e-5
    assert int(skipped.sum()) == 20 and not skipped[:4].any() and not skipped[-4:].any()
    zeroed_model, zeroed_attend = oracle(base, FILTERED, torch.zeros(40, dtype=torch.bool), skipped)
    with attention_implementation(zeroed_model, "filter_oracle", zeroed_attend), torch.no_grad():
        torch.testing.assert_close(logits, zeroed_model(ids).logits, rtol=0, atol=2e-5)


@settings(max_examples=8, deadline=None)
@given(length=st.integers(1, 80), pad=st.integers(0, 20), gamma=st.floats(0.05, 0.99), bulk_part=st.floats(0, 1))
def test_bulk_scoring_equals_token_by_token(length, pad, gamma, bulk_part) -> None:
    """One call over all tokens scores them as a call over the first part, then one call per token."""
    generator = torch.Generator().manual_seed(length)
    k, v = (torch.randn(2, 3, length, 8, generator=generator) + 0.2 for _ in range(2))
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :pad] = False
    anchors, primed = torch.zeros(2, 3, 8), torch.zeros(2, dtype=torch.bool)
    bulk = similarity.kv_similarity(k, v, anchors, anchors, valid, primed, gamma)
    split = int(bulk_part * length)
    pieces = ([torch.arange(split)] if split else []) + [torch.tensor([t]) for t in range(split, length)]
    state, steps = (anchors, anchors, primed), []
    for piece in pieces:
        sim_k, sim_v, a_k, a_v = similarity.kv_similarity(k[:, :, piece], v[:, :, piece], state[0], state[1],
                                                          valid[:, piece], state[2], gamma)
        steps.append((sim_k, sim_v))
        state = (a_k, a_v, state[2] | valid[:, piece].any(-1))
    # float32 rounding differs between the block scan and token-by-token steps: up to ~4e-6 over 300
    # random cases; a wrong recurrence is off by orders of magnitude more
    torch.testing.assert_close(torch.cat([s[0] for s in steps], -1), bulk[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(torch.cat([s[1] for s in steps], -1), bulk[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(state[0], bulk[2], rtol=2e-5, atol=2e-5)


def test_model_prefill_scores_like_token_by_token_feeding() -> None:
    """Through the model: the filtered (last) layer's anchors after one prefill equal those after
    feeding the same tokens one at a time (its K/V do not depend on its own filtering)."""
    model = kvpass.optimize(tiny("llama"), budget=1.0, transforms=[kvpass.FilterTokens(0.5, layers=[FILTERED]),
                                                                    kvpass.Evict()])
    ids = prompt(30)
    bulk, _ = decode(model, ids, ids[:, :0])
    stepwise, _ = decode(model, ids[:, :1], ids[:, 1:])
    one, other = (c.layers[FILTERED].site_cache.state["FilterTokens"] for c in (bulk, stepwise))
    torch.testing.assert_close(one.anchors_k, other.anchors_k, rtol=0, atol=1e-6)
    torch.testing.assert_close(one.anchors_v, other.anchors_v, rtol=0, atol=1e-6)


def test_filters_among_tokens_pruned_before_the_attention() -> None:
    """Under SelectLayer, layer 1 receives the selected tokens only (their TokenPositions); filtering
    there leaves out half of them, the same way: against the oracle that hides the unselected and
    the filtered keys at layer 1 and zeroes the filtered queries, and decoding continues at the full length."""
    base = tiny("llama")
    length, keep = 48, 24
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0, transforms=[
        kvpass.SelectLayer(layer=0, keep=keep, window=4),
        kvpass.FilterTokens(0.5, layers=[FILTERED], warmup=2, recent=2),
        kvpass.Evict()])
    ids = prompt(length)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(ids, **cache_argument(model, cache), use_cache=True).logits
    selected = cache._kvpass_selection.indices[0]
    kept = kept_positions(cache, FILTERED)
    assert logits.shape[1] == keep and len(kept) == keep - keep // 2 and set(kept.tolist()) < set(selected.tolist())
    assert cache.layers[FILTERED].get_seq_length() == length
    hidden = torch.ones(length, dtype=torch.bool)
    hidden[kept] = False
    zeroed = hidden.clone()
    zeroed[~torch.isin(torch.arange(length), selected)] = False
    reference, attend = oracle(base, FILTERED, hidden, zeroed)
    with attention_implementation(reference, "filter_oracle", attend), torch.no_grad():
        expected = reference(ids, use_cache=False).logits[:, selected]
    torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5)
    with torch.no_grad():
        model(ids[:, :1], **cache_argument(model, cache), use_cache=True)
    assert cache.layers[FILTERED].site_cache.seen == length + 1


def test_cache_keeps_earlier_padding_when_a_call_has_gaps() -> None:
    """Slots start being stored at the first call with gaps: the padding read off the mask until then stays padding."""
    cache = CompactedKV(SiteSchedule(1.0, 2 * 2 * 8 * 4, 0), None, 1)
    k = torch.randn(1, 2, 4, 8)
    cache.extend(k, k)
    cache.attend(torch.randn(1, 2, 4, 8), 1.0, key_padding=torch.tensor([[True, False, False, False]]))
    assert cache.slots is None
    cache.extend(k[:, :, :1], k[:, :, :1])
    cache.attend(torch.randn(1, 2, 1, 8), 1.0, key_padding=torch.tensor([[True] + [False] * 5]),
                 positions=TokenPositions(torch.tensor([[1]]), span=2))
    assert cache.slots[0, 0].tolist() == [-1, 1, 2, 3, 5] and cache.seen == 6


def test_forget_takes_a_position_out_only_where_every_row_and_head_holds_it() -> None:
    """How a filtered decode token leaves the cache: by its position, wherever eviction put it."""
    cache = CompactedKV(SiteSchedule(1.0, 2 * 2 * 8 * 4, 0), None, 1)
    k = torch.randn(1, 2, 5, 8)
    cache.extend(k, k)
    cache.attend(torch.randn(1, 2, 5, 8), 1.0)
    assert cache.slots is None and cache.forget(2)
    assert cache.slots[0].tolist() == [[0, 1, 3, 4]] * 2
    torch.testing.assert_close(cache.keys, k[:, :, [0, 1, 3, 4]])
    assert not cache.forget(2) and cache.keys.shape[-2] == 4  # gone already
    cache.slots = torch.tensor([[[0, 1, 3, 4], [0, 3, 4, 1]]], dtype=torch.int32)  # heads in different orders
    assert cache.forget(1)
    assert cache.slots[0].tolist() == [[0, 3, 4], [0, 3, 4]]
    torch.testing.assert_close(cache.keys[:, 0], k[:, 0, [0, 3, 4]])  # each head drops its own column
    torch.testing.assert_close(cache.keys[:, 1], k[:, 1, [0, 1, 3]])
    cache.slots = torch.tensor([[[0, 3, 4], [0, 4, 5]]], dtype=torch.int32)  # head 1 no longer holds 3
    assert not cache.forget(3) and cache.keys.shape[-2] == 3


@pytest.mark.parametrize("decode_step", [0.2, 0.0])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_achieved_ratio_over_prefill_and_decode(ratio, decode_step) -> None:
    """Within 2 points per layer over a long prefill plus 256 decode steps, with the decode threshold tracking
    the ratio (default) or frozen at the prefill's quantile (`decode_step=0`)."""
    model = kvpass.optimize(tiny("llama"), budget=1.0, transforms=[
        kvpass.FilterTokens(ratio, layers="tail", decode_step=decode_step), kvpass.Evict()])
    decode(model, prompt(1024, seed=3), prompt(256, seed=4))
    layers = kvpass.stats(model)["FilterTokens"]["layers"]
    assert len(layers) == 1
    for figures in layers.values():
        assert figures["tokens"] == 1024 + 256
        assert abs(figures["fraction"] - ratio) <= 0.02, figures


@settings(max_examples=8, deadline=None)
@given(budget=st.floats(0.15, 0.9), ratio=st.sampled_from([0.25, 0.5, 0.75]), length=st.integers(1, 60),
       drop_kv=st.booleans(), recent=st.integers(0, 12))
def test_byte_cap_holds_with_eviction_at_every_step(budget, ratio, length, drop_kv, recent) -> None:
    """Also while filtered decode tokens leave the cache (`recent` below and above eviction's window of 8)."""
    model = kvpass.optimize(copy.deepcopy(TINY_LLAMA), budget=budget, transforms=[
        kvpass.FilterTokens(ratio, layers="tail", warmup=4, recent=recent, drop_kv=drop_kv), kvpass.Evict(recent=8)])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt(length), **cache_argument(model, cache), use_cache=True)
        for step in range(24):
            figures = kvpass.stats(model)
            assert figures["kv_bytes"] <= budget * figures["full_kv_bytes"], (step, figures)
            model(prompt(1, seed=step), **cache_argument(model, cache), use_cache=True)


def test_eviction_takes_the_budget_filtering_leaves() -> None:
    """The filtered layer's cap sits at what filtering keeps; the other layer gets the rest of the budget."""
    base = tiny("llama")
    model = kvpass.optimize(copy.deepcopy(base), budget=0.7, transforms=[
        kvpass.FilterTokens(0.5, layers=[FILTERED], recent=32), kvpass.Evict()])
    plan = model.kvpass_plan
    budgets = [plan.budgets[site.name] for site in plan.sites]
    assert budgets[FILTERED] == 0.5 and budgets[0] == pytest.approx(0.9)
    # anchors, then threshold, decode step and count, then the decode queue (a byte per `recent` step)
    assert plan.reserved_bytes == {plan.sites[FILTERED].name: 2 * 2 * 16 * 4 + 12 + 32}
    assert plan.kv_bytes(1000) <= 0.7 * plan.full_kv_bytes(1000)


def test_composes_with_head_pruning_and_eviction() -> None:
    base = tiny("llama")
    model = kvpass.optimize(copy.deepcopy(base), budget=0.3, transforms=[
        kvpass.FilterTokens(0.5, recent=4), kvpass.PruneHeads(0.25, importance="random"), kvpass.Evict()])
    cache, _ = decode(model, prompt(80), prompt(20, seed=5))
    figures = kvpass.stats(model)
    assert figures["PruneHeads"]["kv_heads_removed"] == 1
    assert figures["kv_bytes"] <= 0.3 * figures["full_kv_bytes"]
    assert 0.4 < figures["FilterTokens"]["fraction"] < 0.6
    heads = 2 - len(model.kvpass_plan.pruned_heads.get(model.kvpass_plan.sites[FILTERED].name, []))
    assert model.kvpass_plan.reserved_bytes[model.kvpass_plan.sites[FILTERED].name] == 2 * heads * 16 * 4 + 12 + 4


def test_batch_rows_decide_alone_and_padding_is_never_filtered() -> None:
    model = kvpass.optimize(tiny("llama"), budget=1.0, transforms=[
        kvpass.FilterTokens(0.5, layers=[FILTERED], warmup=4, recent=4), kvpass.Evict()])
    short, long = prompt(30, seed=6), prompt(50, seed=7)
    batch = torch.cat([torch.cat([torch.zeros(1, 20, dtype=torch.long), short], 1), long])
    mask = (batch != 0).long()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
              **cache_argument(model, cache), use_cache=True)
    slots = cache.layers[FILTERED].site_cache.slots[:, 0]
    for row, alone, pad in ((0, short, 20), (1, long, 0)):
        single, _ = decode(model, alone, alone[:, :0])
        assert torch.equal(slots[row][slots[row] >= 0].long() - pad, kept_positions(single, FILTERED))
    # the longer row keeps 25 of its 50 tokens, the padded one 15 of 30 next to 20 padding slots: the
    # rectangular cache holds 35 per row, the longer row's 10 extra ones invisible
    assert slots.shape[-1] == 35 and int((slots[0] < 0).sum()) == 20 and int((slots[1] < 0).sum()) == 10


def test_state_lives_with_each_call_cache() -> None:
    """Two sequences decoded in alternation, each with its own cache, decide as each does alone; a
    call without a cache filters its own tokens the same way."""
    model = kvpass.optimize(tiny("llama"), budget=1.0, transforms=[kvpass.FilterTokens(0.5, layers=[FILTERED]),
                                                                    kvpass.Evict()])
    first, second = (prompt(40, seed=8), prompt(12, seed=9)), (prompt(30, seed=10), prompt(12, seed=11))
    alone = [decode(model, ids, steps)[1] for ids, steps in (first, second)]
    caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
    together = [[], []]
    with torch.no_grad():
        for which, (ids, _) in enumerate((first, second)):
            together[which].append(model(ids, **cache_argument(model, caches[which]), use_cache=True).logits[:, -1])
        for step in range(12):
            for which, (_, steps) in enumerate((first, second)):
                out = model(steps[:, step:step + 1], **cache_argument(model, caches[which]), use_cache=True)
                together[which].append(out.logits[:, -1])
        for which in range(2):
            assert torch.equal(torch.stack(together[which], 1), alone[which])
        without_cache = model(first[0], use_cache=False).logits
        with_cache = model(first[0], **cache_argument(model, DynamicCache(config=model.config)), use_cache=True).logits
    assert torch.equal(without_cache, with_cache)


def test_plan_with_filtering_round_trips_and_applies(tmp_path) -> None:
    base = tiny("llama")
    transforms = [kvpass.FilterTokens(0.25, layers=[0, 1], fusion="key", warmup=8), kvpass.Evict()]
    plan = kvpass.plan(base, budget=0.6, transforms=transforms)
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan and loaded.reserved_bytes == plan.reserved_bytes and len(plan.reserved_bytes) == 2
    first = kvpass.optimize(copy.deepcopy(base), plan=loaded)
    second = kvpass.optimize(copy.deepcopy(base), budget=0.6, transforms=transforms)
    ids = prompt(60)
    assert torch.equal(greedy(first, ids, 8)[1], greedy(second, ids, 8)[1])


@pytest.mark.parametrize("options, message", [
    ({"ratio": 1.0}, "ratio must be a number in \\[0, 1\\)"),
    ({"ratio": -0.1}, "ratio must be"),
    ({"ratio": "0.5"}, "ratio must be"),
    ({"ratio": 0.5, "fusion": "keys"}, "fusion must be one of"),
    ({"ratio": 0.5, "layers": "head"}, "layers must be 'tail'"),
    ({"ratio": 0.5, "layers": []}, "layers must be"),
    ({"ratio": 0.5, "layers": [-1]}, "layers must be"),
    ({"ratio": 0.5, "layers": 1.5}, "layers must be"),
    ({"ratio": 0.5, "gamma": 1.0}, "gamma must be"),
    ({"ratio": 0.5, "warmup": -1}, "warmup must be"),
    ({"ratio": 0.5, "decode_step": -0.1}, "decode_step must be a number in \\[0, inf\\]"),
])
def test_bad_options_are_refused(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        kvpass.FilterTokens(**options)


def test_misuse_is_refused_with_the_model_unchanged() -> None:
    base = tiny("llama")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="layers \\[5\\] are not attention sites"):
        kvpass.optimize(model, budget=1.0, transforms=[kvpass.FilterTokens(0.5, layers=[1, 5]), kvpass.Evict()])
    with pytest.raises(UnsupportedModelError, match="FilterTokens needs kvpass.Evict"):
        kvpass.optimize(model, budget=1.0, transforms=[kvpass.FilterTokens(0.5)])
    with pytest.raises(UnsupportedModelError, match="which token filtering .* cannot hold"):
        kvpass.optimize(model, budget=0.5, transforms=[kvpass.FilterTokens(0.5), kvpass.Evict(per_head=True)])
    with pytest.raises(ValueError, match="reallocate"):
        kvpass.optimize(model, budget=0.5, transforms=[kvpass.FilterTokens(0.5), kvpass.Evict(reallocate=8)])
    with pytest.raises(UnsupportedModelError, match="FilterTokens cannot be applied.*supports \\['hf'\\]"):
        kvpass.optimize(CachedDecoder().eval(), budget=0.5, example_inputs=decode_step_inputs(past_len=40),
                        transforms=[kvpass.FilterTokens(0.5), kvpass.Evict()])
    assert model.config._attn_implementation == base.config._attn_implementation
    assert not hasattr(model, "kvpass_plan")
    torch.manual_seed(0)
    windowed = transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16)).eval()
    with pytest.raises(UnsupportedModelError, match="layers \\[0, 1\\] are sliding-window or chunked"):
        kvpass.optimize(windowed, budget=1.0, transforms=[kvpass.FilterTokens(0.5), kvpass.Evict()])
    ids = prompt(20)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
