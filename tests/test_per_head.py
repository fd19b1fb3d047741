"""Per-head KV budgets in physically ragged caches: AdaKV allocation (`Evict(per_head=True)`) and
DuoAttention streaming heads (`StreamingHeads`): the byte cap at every step, raggedness without
padding, the masked-full oracle, identity, composition, plans and errors."""

from __future__ import annotations

import copy
import functools
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_find_attention import CachedDecoder, decode_step_inputs
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvpass
from kvpass.calibration import Calibration
from kvpass.cost import BATCH, SEQ
from kvpass.errors import UnsupportedModelError
from kvpass.hf_attention import attention_implementation
from kvpass.kernels.ragged import segment_owners
from kvpass.methods import get_method
from kvpass.planning import Plan, build_plan, calibrated_head_shares
from kvpass.planning.head_schedule import LENGTH_BYTES, SHARE_UNIT
from kvpass.runtime.ragged_cache import RaggedKV
from kvpass.site import AttentionSite
from kvpass.streaming_calibration import retrieval_prompts, streaming_errors
from kvpass.runtime.call_arguments import cache_argument

VOCAB, HEAD_DIM, LAYERS = 128, 16, 2


@functools.cache
def _base(heads: int, kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=heads * HEAD_DIM, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         num_hidden_layers=LAYERS, intermediate_size=128, vocab_size=VOCAB, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny(heads: int = 6, kv_heads: int = 3) -> LlamaForCausalLM:
    return copy.deepcopy(_base(heads, kv_heads))


def prompt(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_bytes(kv_heads: int, tokens: int, batch: int = 1) -> int:
    return LAYERS * 2 * batch * kv_heads * tokens * HEAD_DIM * 4


def decode(model, ids: torch.Tensor, steps: int, check=None) -> tuple[DynamicCache, list[torch.Tensor]]:
    """Greedy decode step by step over one cache; `check(cache, seen)` after every call."""
    cache, logits, token = DynamicCache(config=model.config), [], ids
    with torch.no_grad():
        for step in range(steps):
            out = model(token, **cache_argument(model, cache), use_cache=True).logits[:, -1:]
            logits.append(out)
            if check is not None:
                check(cache, ids.shape[1] + step)
            token = out.argmax(-1)
    return cache, logits


def held(site_cache, seen: int) -> torch.Tensor:
    """[B, Hkv, seen] which logical slots each KV head of a site cache holds."""
    if not isinstance(site_cache, RaggedKV):
        batch, heads, length = site_cache.keys.shape[:3]
        slots = site_cache.slots if site_cache.slots is not None else torch.arange(length).expand(batch, heads, length)
        mask = torch.zeros(batch, heads, seen, dtype=torch.bool)
        return mask.scatter_(-1, slots.long().clamp_min(0), slots >= 0)
    batch, heads = site_cache.batch_size, site_cache.heads.kv_heads
    mask = torch.zeros(batch * heads, seen, dtype=torch.bool)
    if site_cache.lengths is not None:
        segments = torch.arange(batch * heads).repeat_interleave(site_cache.lengths.flatten().long())
        mask[segments, site_cache.packed_slots.long()] = True
    mask = mask.view(batch, heads, seen)
    if site_cache.tail_keys is not None:
        tail = site_cache._tail_slots(batch, seen, torch.device("cpu"))
        mask |= torch.zeros(batch, seen, dtype=torch.bool).scatter_(-1, tail.long().clamp_min(0), tail >= 0)[:, None]
    return mask


# --- the byte cap at every decode step ---------------------------------------------------------

GQA = [(4, 2), (6, 3), (4, 4), (8, 2)]


@settings(max_examples=10, deadline=None)
@given(budget=st.floats(0.1, 0.9), geometry=st.sampled_from(GQA), evict_every=st.integers(1, 4),
       method=st.sampled_from(["h2o", "tova", "snapkv", "knorm", "paged", "paged_tova"]),
       streaming=st.sampled_from([0.0, 0.25, 0.5]), allocation=st.sampled_from(["joint", "calibrated"]))
def test_per_head_eviction_holds_the_cap_at_every_step(budget, geometry, evict_every, method, streaming,
                                                       allocation) -> None:
    model = kvpass.optimize(tiny(*geometry), budget=budget, transforms=[
        kvpass.StreamingHeads(streaming, sinks=2, recent=6, importance="random"),
        kvpass.Evict(method, per_head=True, sinks=2, recent=6, evict_every=evict_every, head_allocation=allocation)])

    def check(cache, seen):
        assert kvpass.cache_bytes(cache) <= budget * full_bytes(geometry[1], seen)

    decode(model, prompt(70), 12, check)


@settings(max_examples=5, deadline=None)
@given(geometry=st.sampled_from(GQA), evict_every=st.integers(1, 4), fraction=st.sampled_from([0.25, 0.5, 1.0]),
       length=st.integers(3, 60))
def test_streaming_heads_alone_never_hold_more_than_the_full_cache(geometry, evict_every, fraction, length) -> None:
    model = kvpass.optimize(tiny(*geometry), budget=1.0, transforms=[
        kvpass.StreamingHeads(fraction, sinks=2, recent=6, importance="random", seed=length)])

    def check(cache, seen):
        assert kvpass.cache_bytes(cache) <= full_bytes(geometry[1], seen)

    cache, _ = decode(model, prompt(length), 10, check)
    if length + 9 > 8 + evict_every:  # long enough to trim: streaming heads hold their window only
        streaming = model.kvpass_plan.streaming_heads
        for layer, site in zip(cache.layers, model.kvpass_plan.sites):
            for head in streaming.get(site.name, []):
                assert int(layer.site_cache.head_lengths()[0, head]) <= 8 + evict_every - 1


# --- ragged means ragged ------------------------------------------------------------------------

def test_heads_really_differ_and_memory_is_their_rows_plus_lengths() -> None:
    model = kvpass.optimize(tiny(8, 4), budget=0.25, transforms=[kvpass.Evict("tova", per_head=True, sinks=2,
                                                                               recent=4)])
    cache, _ = decode(model, prompt(200), 1)
    row_bytes = 2 * HEAD_DIM * 4 + 4 + 4  # K, V, int32 slot, float32 statistic
    expected = 0
    for layer in cache.layers:
        site_cache = layer.site_cache
        assert isinstance(site_cache, RaggedKV) and site_cache.tail_keys is None
        lengths = site_cache.lengths
        assert site_cache.packed_keys.shape[0] == int(lengths.sum())  # packed: no padding row anywhere
        expected += int(lengths.sum()) * row_bytes + lengths.numel() * LENGTH_BYTES
    assert any(len(set(layer.site_cache.lengths.flatten().tolist())) > 1 for layer in cache.layers)
    assert kvpass.cache_bytes(cache) == expected == model.kvpass_plan.kv_bytes(200)
    assert kvpass.cache_bytes(cache) <= 0.25 * full_bytes(4, 200)
    figures = kvpass.stats(model)
    assert all(len(site["head_tokens"][0]) == 4 for site in figures["sites"].values())


def test_calibrated_shares_set_each_heads_length() -> None:
    """`head_allocation="calibrated"`: every budgeted head keeps its fixed share of the rows (only what
    rounding leaves goes by the joint top-k), and the shares follow calibration's error curves."""
    model = kvpass.optimize(tiny(8, 4), budget=0.25, transforms=[
        kvpass.Evict("tova", per_head=True, head_allocation="calibrated", sinks=2, recent=4)])
    plan, seen = model.kvpass_plan, 200
    assert set(plan.head_shares) == {site.name for site in plan.sites}
    assert any(len(set(shares)) > 1 for shares in plan.head_shares.values())
    cache, _ = decode(model, prompt(seen), 1)
    for layer, site in zip(cache.layers, plan.sites):
        heads = plan.head_schedule(site, 4)
        firsts, extra = heads.split(heads.rows(seen))
        lengths = layer.site_cache.head_lengths()[0].tolist()
        assert all(first <= length <= first + extra for first, length in zip(firsts, lengths))
        assert sum(lengths) == sum(firsts) + extra <= heads.rows(seen)
        assert extra < max(firsts) - min(firsts)  # the shares, not the joint top-k, set the lengths apart
    assert kvpass.cache_bytes(cache) <= 0.25 * full_bytes(4, seen)


def test_calibrated_shares_give_rows_to_the_heads_that_lose_most() -> None:
    """A head whose output error does not move when cut keeps only its floor; the rest goes to the
    head whose error falls as it keeps more."""
    site = AttentionSite("layers.0.attn", 0, 4, 2, 16, None, True)
    plan = build_plan([site], 0.5, get_method("tova"))
    grid = 64
    calibration = Calibration(
        method="tova", prompt_tokens=[100], entropy={site.name: [0.5, 0.5]}, retention={site.name: [[1.0] * 65] * 2},
        output_error={site.name: [[0.0] * (grid + 1), [1 - i / grid for i in range(grid + 1)]]}, seconds=0.0)
    shares = calibrated_head_shares(plan, calibration, head_floor=0.2)[site.name]
    assert shares[0] == int(0.2 * SHARE_UNIT) and shares[1] > SHARE_UNIT and sum(shares) <= 2 * SHARE_UNIT
    assert calibrated_head_shares(build_plan([site], 1.0, get_method("tova")), calibration, 0.2) == {}


def test_streaming_heads_hold_their_window_and_retrieval_heads_get_the_rest() -> None:
    plain = kvpass.optimize(tiny(), budget=0.4, transforms=[kvpass.Evict("knorm", sinks=2, recent=4)])
    model = kvpass.optimize(tiny(), budget=0.4, transforms=[
        kvpass.StreamingHeads(1 / 3, sinks=2, recent=8, importance="random"), kvpass.Evict("knorm", sinks=2, recent=4)])
    ids = prompt(150)
    plain_cache, _ = decode(plain, ids, 1)
    cache, _ = decode(model, ids, 1)
    plan = model.kvpass_plan
    assert sum(map(len, plan.streaming_heads.values())) == 2  # floor(6 / 3)
    for layer, plain_layer, site in zip(cache.layers, plain_cache.layers, plan.sites):
        streaming = plan.streaming_heads.get(site.name, [])
        lengths = layer.site_cache.head_lengths()[0]
        if streaming:
            assert all(int(lengths[h]) == 10 for h in streaming)
            retrieval = [int(lengths[h]) for h in range(3) if h not in streaming]
            assert min(retrieval) > plain_layer.site_cache.keys.shape[2]  # more than under Evict alone
    assert kvpass.cache_bytes(cache) == plan.kv_bytes(150) <= 0.4 * full_bytes(3, 150)



def test_streaming_plans_give_the_budget_to_the_heads_that_keep_their_cache() -> None:
    """Uniform over the budgeted heads, not the sites: with 3 of 6 KV heads streaming at budget 0.6, each
    streaming head gets σ = (0.6 * 6 - 3) / 3 = 0.2 of a full head and every other head a whole one, so past
    window / σ = 50 tokens no budgeted head evicts, whichever layer the random choice put it in."""
    model = kvpass.optimize(tiny(), budget=0.6, transforms=[
        kvpass.StreamingHeads(0.5, sinks=2, recent=8, importance="random"), kvpass.Evict("knorm", sinks=2, recent=4)])
    plan = model.kvpass_plan
    for site in plan.sites:
        streaming = len(plan.streaming_heads.get(site.name, []))
        assert plan.budgets[site.name] == pytest.approx((3 - streaming + 0.2 * streaming) / 3)
    cache, _ = decode(model, prompt(150), 1)
    for layer, site in zip(cache.layers, plan.sites):
        streaming = plan.streaming_heads.get(site.name, [])
        lengths = [int(length) for length in layer.site_cache.head_lengths()[0]]
        assert lengths == [10 if head in streaming else 150 for head in range(3)]
    assert kvpass.cache_bytes(cache) <= 0.6 * full_bytes(3, 150)
    assert build_plan(plan.sites, 0.4, get_method("knorm"), streaming_heads=plan.streaming_heads).budgets == {
        site.name: 0.4 for site in plan.sites}  # the budgeted heads need more than the budget: plain uniform


# --- the masked-full oracle ---------------------------------------------------------------------

def masked_oracle(base, ids: torch.Tensor, tokens: list[torch.Tensor], masks: list[list[torch.Tensor]]):
    """Logits of the unmodified model over a full cache where, at each step, every KV head sees only the
    keys the ragged cache held after the previous step (and the new token)."""
    state: dict = {}

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        batch, heads, new, _ = query.shape
        kv_heads, total = key.shape[1], key.shape[2]
        visible = torch.ones(batch, kv_heads, new, total, dtype=torch.bool).tril(total - new)
        if state.get("held") is not None:
            visible[..., :total - new] &= state["held"][module.layer_idx][:, :, None, :]
        group = heads // kv_heads
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1),
            attn_mask=visible.repeat_interleave(group, 1), scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    cache, logits = DynamicCache(config=base.config), []
    with attention_implementation(base, "kvpass_test_oracle", attention), torch.no_grad():
        for step, token in enumerate([ids, *tokens[:-1]]):
            state["held"] = masks[step - 1] if step else None
            logits.append(base(token, **cache_argument(base, cache), use_cache=True).logits[:, -1:])
    return logits


@pytest.mark.parametrize("transforms", [
    [kvpass.Evict("h2o", per_head=True, sinks=2, recent=4, evict_every=3)],
    [kvpass.Evict("tova", per_head=True, sinks=2, recent=4)],
    [kvpass.Evict("snapkv", per_head=True, sinks=2, recent=4, window=8, span=1)],
    [kvpass.Evict("paged", per_head=True, sinks=2, recent=4, page_size=4)],
    [kvpass.Evict("paged_tova", per_head=True, sinks=2, recent=4, page_size=4)],
    [kvpass.StreamingHeads(0.5, sinks=2, recent=8, importance="random")],
    [kvpass.StreamingHeads(1 / 3, sinks=2, recent=8, importance="random"),
     kvpass.Evict("knorm", per_head=True, sinks=2, recent=4, evict_every=2)],
], ids=["h2o", "tova", "snapkv-span", "paged", "paged_tova", "streaming", "streaming+knorm"])
def test_decoding_equals_the_full_model_with_each_heads_evicted_keys_masked(transforms) -> None:
    budget = 1.0 if len(transforms) == 1 and isinstance(transforms[0], kvpass.StreamingHeads) else 0.3
    model = kvpass.optimize(tiny(), budget=budget, transforms=transforms)
    ids, masks = prompt(100, seed=3), []
    _, logits = decode(model, ids, 12, lambda cache, seen: masks.append(
        [held(layer.site_cache, seen) for layer in cache.layers]))
    assert any(int(mask.sum()) < mask.numel() for mask in masks[-1])  # something was evicted
    tokens = [step.argmax(-1) for step in logits]
    expected = masked_oracle(copy.deepcopy(_base(6, 3)), ids, tokens, masks)
    for got, want in zip(logits, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --- identity and composition -------------------------------------------------------------------

def test_zero_streaming_heads_change_nothing() -> None:
    base, ids = _base(6, 3), prompt(60)
    model = kvpass.optimize(tiny(), budget=1.0, transforms=[kvpass.StreamingHeads(0)])
    assert model.kvpass_plan.streaming_heads == {}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-5)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False),
                       base.generate(ids, max_new_tokens=12, do_sample=False))
    with_evict = kvpass.optimize(tiny(), budget=0.5, transforms=[kvpass.StreamingHeads(0), kvpass.Evict("h2o")])
    alone = kvpass.optimize(tiny(), budget=0.5, transforms=[kvpass.Evict("h2o")])
    assert torch.equal(with_evict.generate(ids, max_new_tokens=12, do_sample=False),
                       alone.generate(ids, max_new_tokens=12, do_sample=False))


def test_per_head_budgets_at_budget_one_keep_the_uniform_cache() -> None:
    base, ids = _base(6, 3), prompt(60)
    model = kvpass.optimize(tiny(), budget=1.0, transforms=[kvpass.Evict("tova", per_head=True)])
    cache, _ = decode(model, ids, 1)
    assert kvpass.cache_bytes(cache) == full_bytes(3, 60)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       base.generate(ids, max_new_tokens=8, do_sample=False))


def test_head_pruning_streaming_and_per_head_eviction_share_one_cap(tmp_path) -> None:
    transforms = [kvpass.PruneHeads(0.25, importance="random"), kvpass.StreamingHeads(1 / 3, importance="random",
                                                                                       sinks=2, recent=6),
                  kvpass.Evict("tova", per_head=True, sinks=2, recent=4, evict_every=2)]
    plan = kvpass.plan(tiny(8, 4), budget=0.35, transforms=transforms)
    for name, heads in plan.streaming_heads.items():
        assert not set(heads) & set(plan.pruned_heads.get(name, []))  # a removed head cannot stream
    assert sum(map(len, plan.streaming_heads.values())) == 2  # a third of the 6 KV heads left
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    model = kvpass.optimize(tiny(8, 4), plan=loaded)
    ids = prompt(90)

    def check(cache, seen):
        assert kvpass.cache_bytes(cache) <= 0.35 * full_bytes(4, seen)

    cache, logits = decode(model, ids, 8, check)
    assert [layer.site_cache.heads.kv_heads for layer in cache.layers] == [
        4 - len(plan.pruned_heads.get(site.name, [])) for site in plan.sites]
    again = kvpass.optimize(tiny(8, 4), budget=0.35, transforms=transforms)
    assert again.kvpass_plan.streaming_heads == plan.streaming_heads
    torch.testing.assert_close(decode(again, ids, 8)[1], logits)


def test_batched_left_padded_and_beam_generation() -> None:
    model = kvpass.optimize(tiny(), budget=0.4, transforms=[
        kvpass.StreamingHeads(1 / 3, sinks=2, recent=6, importance="random"),
        kvpass.Evict("h2o", per_head=True, sinks=2, recent=4, evict_every=2)])
    ids = prompt(50, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # left padding
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], alone[0])  # the unpadded row evicts exactly as alone
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_argument(model, cache), use_cache=True)
    for layer in cache.layers:
        site_cache = layer.site_cache
        second = site_cache.packed_slots[int(site_cache.lengths[0].sum()):]
        assert second.numel() and (second >= 7).all()  # padding is never kept
    beams = model.generate(ids[:1], max_new_tokens=5, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (1, 55)


# --- choosing streaming heads -------------------------------------------------------------------

def test_streaming_heads_are_the_smallest_measured_errors() -> None:
    base = _base(6, 3)
    sites = kvpass.find_attention(base)
    prompts = retrieval_prompts(vocab_size=VOCAB, count=2, length=120)
    errors = streaming_errors(base, sites, prompts, sinks=2, recent=8)
    assert all(len(values) == 3 and min(values) > 0 for values in errors.values())
    short = streaming_errors(base, sites, [prompt(10)], sinks=2, recent=8)  # nothing past the window: no error
    assert all(max(values) < 1e-6 for values in short.values())
    plan = kvpass.plan(tiny(), budget=1.0, transforms=[kvpass.StreamingHeads(0.5, sinks=2, recent=8)],
                       calibration=prompts)
    chosen = sorted((name, head) for name, heads in plan.streaming_heads.items() for head in heads)
    smallest = sorted(sorted((value, name, head) for name, values in errors.items()
                             for head, value in enumerate(values))[:3])
    assert chosen == sorted((name, head) for _, name, head in smallest)


def test_retrieval_prompts_put_the_asked_fact_far_back() -> None:
    class Words:
        def __call__(self, text, return_tensors=None):
            ids = torch.tensor([[hash(w) % 1000 + 1 for w in text.split()]])
            return type("Encoded", (), {"input_ids": ids})()

    texts = retrieval_prompts(Words(), count=3, length=400, seed=1)
    for text in texts:
        asked = text.rsplit("What is the ", 1)[1].split(" code?")[0]
        fact = text.index(f"The {asked} code is ")
        assert len(text[fact:].split()) > 64  # further back than the streaming window
    assert texts != retrieval_prompts(Words(), count=3, length=400, seed=2)


# --- plans ----------------------------------------------------------------------------------------

SITES = [AttentionSite(f"layers.{i}.attn", i, 9, 3, 64, None, True) for i in range(3)]


@settings(max_examples=60, deadline=None)
@given(budget=st.floats(0.05, 1.0), seq_len=st.integers(1, 9000), evict_every=st.integers(1, 8),
       method=st.sampled_from(["tova", "knorm", "paged", "h2o"]), streaming=st.integers(0, 5), joint=st.booleans())
def test_planned_bytes_stay_within_the_budget(budget, seq_len, evict_every, method, streaming, joint) -> None:
    plan = build_plan(SITES, budget, get_method(method), evict_every=evict_every)
    plan.per_head_budgets = joint
    plan.streaming_heads = {site.name: list(range(min(3, streaming - 3 * i))) for i, site in enumerate(SITES)
                            if streaming > 3 * i}
    assert plan.kv_bytes(seq_len) <= Fraction(budget) * plan.full_kv_bytes(seq_len)


@pytest.mark.parametrize("joint,streaming,method,shares", [
    (True, {}, "paged", {}), (False, {"layers.1.attn": [0, 2]}, "tova", {}), (True, {"layers.0.attn": [1]}, "h2o", {}),
    (True, {"layers.0.attn": [1]}, "knorm", {"layers.0.attn": [20, 100], "layers.2.attn": [13, 64, 115]})])
def test_symbolic_bytes_are_the_ragged_arithmetic(joint, streaming, method, shares) -> None:
    plan = build_plan(SITES, 0.3, get_method(method), evict_every=3)
    plan.per_head_budgets, plan.streaming_heads, plan.head_shares = joint, streaming, shares
    expression = plan.kv_bytes_expr
    for seq_len in (1, 7, 50, 301, 4095):
        assert expression.subs({SEQ: seq_len, BATCH: 2}) == plan.kv_bytes(seq_len, 2)


def test_plans_validate_the_new_fields_and_old_plans_load() -> None:
    plan = build_plan(SITES, 0.5, get_method("tova"))
    data = plan.to_dict()
    assert data["format"] == 3
    for field, bad, message in [("streaming_heads", {"layers.0.attn": [3]}, "streaming_heads"),
                                ("streaming_heads", {"nowhere": [0]}, "not a site"),
                                ("head_floor", 1.5, "head_floor"), ("per_head_budgets", "yes", "per_head_budgets"),
                                ("head_shares", {"layers.0.attn": [64, 64, 64]}, "per_head_budgets"),
                                ("head_shares", {"nowhere": [64]}, "not a site")]:
        with pytest.raises(ValueError, match=message):
            Plan.from_dict({**data, field: bad})
    per_head = {**data, "per_head_budgets": True}
    for bad in ([64, 64], [64, 64, -1], [100, 100, 100], [64, 64, 64.0]):
        with pytest.raises(ValueError, match="head_shares"):
            Plan.from_dict({**per_head, "head_shares": {"layers.0.attn": bad}})
    shared = Plan.from_dict({**per_head, "head_shares": {"layers.0.attn": [10, 100, 82]}})
    assert Plan.from_dict(shared.to_dict()).head_shares == {"layers.0.attn": [10, 100, 82]}
    pruned = {**data, "pruned_heads": {"layers.0.attn": [1]}, "streaming_heads": {"layers.0.attn": [1]}}
    with pytest.raises(ValueError, match="pruned_heads does not remove"):
        Plan.from_dict(pruned)
    old = {key: value for key, value in data.items()
           if key not in ("per_head_budgets", "head_floor", "streaming_heads", "streaming_sinks", "streaming_recent")}
    old["format"] = 2
    old["method"] = {"name": "tova", "options": {**{k: v for k, v in data["method"]["options"].items()
                                                   if k != "shared_keep_set"}, "per_head": False}}
    assert Plan.from_dict(old).method == get_method("tova", shared_keep_set=True)


# --- errors ---------------------------------------------------------------------------------------

def test_bad_options_and_unsupported_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="per_head"):
        kvpass.Evict(per_head="yes")
    with pytest.raises(ValueError, match="head_floor"):
        kvpass.Evict(per_head=True, head_floor=2)
    with pytest.raises(ValueError, match="reallocate"):
        kvpass.Evict(per_head=True, reallocate=8)
    with pytest.raises(ValueError, match="head_allocation='adaptive'"):
        kvpass.Evict(per_head=True, head_allocation="adaptive")
    with pytest.raises(ValueError, match="needs per_head=True"):
        kvpass.Evict(head_allocation="calibrated")
    with pytest.raises(ValueError, match="fraction"):
        kvpass.StreamingHeads(1.5)
    with pytest.raises(ValueError, match="recent"):
        kvpass.StreamingHeads(0.5, recent=-1)
    with pytest.raises(ValueError, match="importance"):
        kvpass.StreamingHeads(0.5, importance="magic")
    with pytest.raises(TypeError, match="renamed shared_keep_set"):
        type("Old", (kvpass.Method,), {"__annotations__": {"per_head": bool}, "per_head": False})
    model = tiny()
    with pytest.raises(ValueError, match="none of them evicts"):  # a short sequence keeps everything
        kvpass.optimize(model, budget=0.5, transforms=[kvpass.StreamingHeads(0.5, importance="random")])
    decoder, inputs = CachedDecoder().eval(), decode_step_inputs(past_len=40)
    with pytest.raises(UnsupportedModelError, match="ragged cache"):
        kvpass.optimize(decoder, budget=0.5, example_inputs=inputs, transforms=[kvpass.Evict("knorm", per_head=True)])
    with pytest.raises(UnsupportedModelError, match="StreamingHeads cannot be applied"):
        kvpass.optimize(decoder, budget=1.0, example_inputs=inputs,
                        transforms=[kvpass.StreamingHeads(0.5, importance="random")])


def test_segment_owners() -> None:
    lengths = torch.tensor([[2, 0, 1], [1, 3, 0]], dtype=torch.int32)
    assert segment_owners(lengths).tolist() == [0, 0, 2, 0, 1, 1, 1]
