"""SelectLayer: prefill token selection that propagates (ASL, FastKV fixed layer, GemFilter two passes).

Checked against oracles built from the unmodified model: one pass equals the dense model whose
attention hides the unselected keys after the selection layer (on the kept tokens, and on the
next decode step); two passes equal feeding only the selected tokens at their own positions.
"""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
import transformers
from transformers import DynamicCache

import kvpass
from kvpass.errors import UnsupportedModelError
from kvpass.eval.coverage import check, selection_oracle_mismatch
from kvpass.memory import cache_bytes
from kvpass.runtime.hf_selection import SELECTION_ATTRIBUTE, SelectionRule, SelectionState, decide_layer
from kvpass.runtime.layer_selection import rank_variance_ratio, selected_tokens
from kvpass.runtime.call_arguments import cache_argument

LAYERS, LENGTH, WINDOW, KEEP = 6, 96, 8, 40


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def prompt(batch: int = 2, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(1))


SITES = {}


def optimized(base: torch.nn.Module, budget: float | str, transforms: list) -> torch.nn.Module:
    """An optimized copy of `base` (its attention sites found once: the test model never changes)."""
    model = copy.deepcopy(base)
    if "tiny" not in SITES:
        SITES["tiny"] = kvpass.find_attention(base)
    model.kvpass_sites = SITES["tiny"]
    return kvpass.optimize(model, budget=budget, transforms=transforms)


def selecting(transform: kvpass.SelectLayer, budget: float | str = 1.0, base: torch.nn.Module | None = None):
    """An optimized copy of the tiny model (the unmodified one is `base`), selecting and evicting."""
    return optimized(base if base is not None else tiny_llama(), budget, [transform, kvpass.Evict("snapkv")])


def prefill(model: torch.nn.Module, ids: torch.Tensor):
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(ids, **cache_argument(model, cache), use_cache=True).logits
    return logits, cache


def selection(cache) -> SelectionState:
    return getattr(cache, SELECTION_ATTRIBUTE)


def test_propagation_shortens_deeper_layers_and_their_caches():
    base, ids = tiny_llama(), prompt()
    model = selecting(kvpass.SelectLayer(layer=2, keep=KEEP, window=WINDOW), base=base)
    lengths = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: lengths.update({i: o.shape[1]}))
             for i, layer in enumerate(model.model.layers)]
    logits, cache = prefill(model, ids)
    for hook in hooks:
        hook.remove()
    assert lengths == {0: LENGTH, 1: LENGTH, 2: LENGTH, 3: KEEP, 4: KEEP, 5: KEEP}
    assert logits.shape[1] == KEEP
    held = [layer.keys.shape[-2] for layer in cache.layers]
    assert held == [LENGTH] * 3 + [KEEP] * 3
    deep, shallow = cache_bytes(cache.layers[3].site_cache.tensors()), cache_bytes(cache.layers[0].site_cache.tensors())
    assert deep < shallow * KEEP / LENGTH * 1.25  # K/V of KEEP tokens plus their int32 slots
    assert [layer.get_seq_length() for layer in cache.layers] == [LENGTH] * LAYERS
    figures = kvpass.stats(model)
    assert figures["SelectLayer"] == {"layer": 2, "row_layers": [2, 2], "row_settled": [], "prompt_tokens": LENGTH,
                                      "tokens_kept": KEEP}
    assert figures["kv_bytes"] == cache_bytes(cache) < figures["full_kv_bytes"]


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_the_cache_is_found_under_either_keyword_a_caller_uses(keyword: str):
    """transformers 5.24 renamed the cache argument `past_key_values=` to `cache=` (still taking the old
    name until 5.40): selection, its stats and the cache it shortens follow whichever name the call used."""
    base, ids = tiny_llama(), prompt()
    if keyword not in inspect.signature(base.forward).parameters and keyword == "cache":
        pytest.skip(f"transformers {transformers.__version__} takes the cache as past_key_values= only")
    model, cache = selecting(kvpass.SelectLayer(layer=2, keep=KEEP, window=WINDOW), base=base), DynamicCache()
    with torch.no_grad():
        logits = model(ids, **{keyword: cache}, use_cache=True).logits
    assert logits.shape[1] == KEEP
    assert [layer.keys.shape[-2] for layer in cache.layers] == [LENGTH] * 3 + [KEEP] * 3
    assert kvpass.stats(model)["SelectLayer"]["layer"] == 2
    assert kvpass.stats(model)["kv_bytes"] == cache_bytes(cache)


def test_one_pass_equals_dense_model_masking_unselected_keys_then_decodes_at_the_right_positions():
    base, ids = tiny_llama(), prompt()
    model = selecting(kvpass.SelectLayer(layer=2, keep=KEEP, window=WINDOW), base=base)
    indices = selection(prefill(model, ids)[1]).indices
    assert indices.shape == (2, KEEP) and bool((indices[:, -WINDOW:] == torch.arange(LENGTH - WINDOW, LENGTH)).all())
    assert selection_oracle_mismatch(base, model, ids, 2, atol=1e-5) == ""


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma", "phi3", "olmo2", "granite", "cohere", "phi",
                                        "mixtral", "qwen2_moe", "granitemoe"])
def test_one_pass_oracle_holds_on_other_decoder_architectures(model_type: str):
    """Other layouts of the Llama family (QK norms, partial rotary, parallel blocks, MoE, logit scales, a layer
    taking position_ids only through **kwargs): the narrowed mask, positions and rotary embeddings must be right
    for each, as the oracle checks (`benchmarks/coverage.py --transform select` runs every model type)."""
    verdict = check(model_type, "select")
    assert verdict.status == "ok", verdict.detail


def test_two_pass_equals_feeding_only_the_selected_tokens_at_their_positions():
    base, ids = tiny_llama(), prompt()
    model = selecting(kvpass.SelectLayer(layer=3, keep=KEEP, window=WINDOW, two_pass=True), base=base)
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda m, a, o: calls.append(o.shape[1]) and None)
    logits, cache = prefill(model, ids)
    hook.remove()
    assert calls == [LENGTH, KEEP]  # the first pass, then the whole model again on the selection
    indices = selection(cache).indices
    assert [layer.keys.shape[-2] for layer in cache.layers] == [KEEP] * LAYERS
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        step = model(nxt, **cache_argument(model, cache), use_cache=True).logits[:, -1]
        reference_cache = DynamicCache()
        reference = base(torch.gather(ids, 1, indices), position_ids=indices,
                         **cache_argument(base, reference_cache)).logits
        reference_step = base(nxt, position_ids=torch.full((2, 1), LENGTH),
                              **cache_argument(base, reference_cache)).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, reference_step[:, -1], atol=1e-5, rtol=1e-5)


def test_keep_all_tokens_is_the_unmodified_model():
    base, ids = tiny_llama(), prompt()
    model = selecting(kvpass.SelectLayer(layer=1, keep=LENGTH + 8, window=WINDOW), base=base)
    logits, _ = prefill(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(logits, base(ids).logits, atol=1e-5, rtol=1e-5)
    assert kvpass.stats(model)["SelectLayer"]["layer"] is None
    ours = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, base.generate(ids, max_new_tokens=6, do_sample=False))


def test_large_tau_selects_at_min_layer_like_the_fixed_layer_and_tau_zero_is_eviction_alone():
    base, ids = tiny_llama(), prompt()
    options = dict(keep=KEEP, window=WINDOW)
    adaptive = selecting(kvpass.SelectLayer(tau=10.0, min_layer=2, **options), budget=0.6, base=base)
    fixed = selecting(kvpass.SelectLayer(layer=2, **options), budget=0.6, base=base)
    logits, cache = prefill(adaptive, ids)
    assert selection(cache).layer == 2
    assert torch.equal(logits, prefill(fixed, ids)[0])
    assert torch.equal(adaptive.generate(ids, max_new_tokens=5, do_sample=False),
                       fixed.generate(ids, max_new_tokens=5, do_sample=False))
    never = selecting(kvpass.SelectLayer(tau=0.0, **options), budget=0.6, base=base)
    evict = optimized(base, 0.6, [kvpass.Evict("snapkv")])
    assert torch.equal(never.generate(ids, max_new_tokens=5, do_sample=False),
                       evict.generate(ids, max_new_tokens=5, do_sample=False))
    assert kvpass.stats(never)["SelectLayer"]["layer"] is None


def test_the_chosen_layer_is_reported_and_deterministic():
    base, ids = tiny_llama(), prompt()
    model = selecting(kvpass.SelectLayer(tau=0.75, min_layer=1, observe=2, keep=KEEP, window=WINDOW), base=base)
    first = selection(prefill(model, ids)[1])
    again = selection(prefill(model, ids)[1])
    assert first.layer is not None and first.layer == max(first.row_layers)
    assert first.row_layers == again.row_layers and torch.equal(first.indices, again.indices)
    assert kvpass.stats(model)["SelectLayer"]["row_layers"] == first.row_layers


def test_rank_variance_rule_on_a_constructed_ranking():
    """Rows whose ranking settles at different layers: each row's layer is the first whose ratio is under
    tau, and the batch selects at the deepest, with that layer's scores."""
    settled = torch.arange(20, 0, -1).float()
    shuffled = settled[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    layers = [torch.stack([shuffled, shuffled.flip(0)]), torch.stack([settled, settled.flip(0)]),
              torch.stack([settled, settled]), torch.stack([settled * 2, settled])]
    rule = SelectionRule(layers=6, first_scored=1, window=4, kernel=3, two_pass=False, tau=0.3, observe=2, keep=9)
    state = SelectionState(length=24, keep=9, active=True)
    for index, scores in enumerate(layers, start=1):
        state.history = (state.history + [scores])[-rule.observe:]
        decide_layer(rule, state, index)
        ratio = rank_variance_ratio(state.history, 5)
        if index == 1:
            assert ratio.tolist() == [1.0, 1.0]  # the first observed layer is the reference
        if state.layer is not None:
            break
    assert rank_variance_ratio([layers[1][:1], layers[2][:1]], 5).item() == 0.0
    assert state.row_layers == [3, 4] and state.layer == 4 and state.row_settled == [True, True]
    assert torch.equal(state.indices, selected_tokens(layers[3], 24, 9))


def test_a_ranking_unsettled_at_max_layer_selects_there():
    """Rows whose rankings keep changing: nothing passes tau, so the batch selects at max_layer, with its scores."""
    generator = torch.Generator().manual_seed(2)
    layers = [torch.rand(2, 20, generator=generator) for _ in range(4)]
    rule = SelectionRule(layers=8, first_scored=1, window=4, kernel=3, two_pass=False, tau=0.01, observe=2, keep=9,
                         max_layer=4)
    state = SelectionState(length=24, keep=9, active=True)
    for index, scores in enumerate(layers, start=1):
        assert state.layer is None
        state.history = (state.history + [scores])[-rule.observe:]
        decide_layer(rule, state, index)
    assert state.layer == 4 and state.row_layers == [4, 4] and state.row_settled == [False, False]
    assert torch.equal(state.indices, selected_tokens(layers[-1], 24, 9))


def test_asl_on_a_model_selects_by_max_layer_and_reports_which_rows_settled():
    base, ids = tiny_llama(), prompt()
    model = selecting(kvpass.SelectLayer(tau=1e-6, min_layer=1, observe=2, max_layer=3, keep=KEEP, window=WINDOW),
                      base=base)
    logits, cache = prefill(model, ids)
    figures = kvpass.stats(model)["SelectLayer"]
    assert figures["layer"] == 3 and figures["row_layers"] == [3, 3] and figures["row_settled"] == [False, False]
    assert logits.shape[1] == KEEP
    assert [layer.keys.shape[-2] for layer in cache.layers] == [LENGTH] * 4 + [KEEP] * 2


def test_byte_cap_holds_at_every_step():
    model = selecting(kvpass.SelectLayer(layer=2, window=WINDOW), budget=0.5)
    ids = prompt(length=120)
    with torch.no_grad():
        cache = DynamicCache()
        out = model(ids, **cache_argument(model, cache), use_cache=True)
        for _ in range(12):
            figures = kvpass.stats(model)
            assert figures["kv_bytes"] <= 0.5 * figures["full_kv_bytes"]
            out = model(out.logits[:, -1:].argmax(-1), **cache_argument(model, cache), use_cache=True)
    assert kvpass.stats(model)["SelectLayer"]["tokens_kept"] <= 60


def test_left_padded_batch_generates_like_each_row_alone():
    base = tiny_llama()
    model = selecting(kvpass.SelectLayer(layer=2, keep=KEEP, window=WINDOW), base=base)
    long, short = prompt(1, LENGTH)[0], prompt(1, LENGTH - 10)[0]
    ids = torch.stack([long, torch.cat([torch.zeros(10, dtype=torch.long), short])])
    mask = (ids != 0).long()
    mask[0] = 1
    together = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)[:, -4:]
    alone = model.generate(short[None], max_new_tokens=4, do_sample=False)[:, -4:]
    assert torch.equal(together[1:], alone)


@pytest.mark.parametrize("options, message", [
    (dict(tau=0.3, layer=2), "not both"),
    (dict(layer=2, min_layer=1), "observe, min_layer and max_layer"),
    (dict(layer=2, max_layer=3), "observe, min_layer and max_layer"),
    (dict(max_layer=-1), "max_layer must be an int >= 0"),
    (dict(kernel=4), "kernel must be odd"),
    (dict(keep=8, window=8), "keep must be an int >= 9"),
    (dict(tau=-1.0), "tau must be a number"),
    (dict(two_pass="yes"), "two_pass"),
])
def test_bad_options_name_the_argument(options, message):
    with pytest.raises(ValueError, match=message):
        kvpass.SelectLayer(**options)


def test_refusals_leave_the_model_unchanged():
    base = tiny_llama()
    with pytest.raises(ValueError, match="layer=5 must be at most 4"):
        kvpass.optimize(base, budget=0.5, transforms=[kvpass.SelectLayer(layer=5), kvpass.Evict()])
    with pytest.raises(ValueError, match=r"max_layer=1 must lie within min_layer=2\.\.4"):
        kvpass.optimize(base, budget=0.5, transforms=[kvpass.SelectLayer(min_layer=2, max_layer=1), kvpass.Evict()])
    with pytest.raises(UnsupportedModelError, match="needs kvpass.Evict"):
        kvpass.optimize(base, budget=1.0, transforms=[kvpass.SelectLayer(layer=2)])
    assert getattr(base, "kvpass_plan", None) is None and not base.model.layers[3]._forward_pre_hooks
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(1, 5, 32)
    with pytest.raises(UnsupportedModelError, match=r"SelectLayer cannot be applied.*supports \['hf'\]"):
        kvpass.optimize(mha, budget=1.0, example_inputs=(x, x, x), transforms=[kvpass.SelectLayer(layer=0)])


def test_reoptimizing_without_selection_turns_it_off():
    base, ids = tiny_llama(), prompt()
    model = selecting(kvpass.SelectLayer(layer=2, keep=KEEP, window=WINDOW), base=base)
    model = kvpass.optimize(model, budget=1.0, transforms=[kvpass.Evict("snapkv")])
    logits, cache = prefill(model, ids)
    assert logits.shape[1] == LENGTH and getattr(cache, SELECTION_ATTRIBUTE, None) is None


def test_a_model_without_the_llama_layout_is_refused_by_name():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=2, n_layer=3, vocab_size=64,
                                                                 n_positions=64)).eval()
    with pytest.raises(UnsupportedModelError, match=r"no decoder `model.layers` list"):
        kvpass.optimize(gpt2, budget=0.5, transforms=[kvpass.SelectLayer(layer=1), kvpass.Evict()])
    assert getattr(gpt2, "kvpass_plan", None) is None


def test_a_decoder_layer_that_drops_keyword_arguments_is_refused_with_the_reason():
    """StableLM's decoder layer calls self_attn without its **kwargs, so the scores never reach kvpass: the
    prefill stops with an error that says so, instead of blaming a missing Evict."""
    verdict = check("stablelm", "select")
    assert verdict.status == "refused"
    assert re.search(r"decoder layer 0 \(StableLmDecoderLayer\).*does not pass its keyword arguments on to self_attn",
                     verdict.detail), verdict.detail
