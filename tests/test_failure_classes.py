"""One test per class of failure the coverage matrix found (`benchmarks/coverage.py`), each on examples
written here: hand-written attention modules, tiny configs, and a tiny Llama whose attention module is
swapped for variants real models have. Every class ends either supported (checked against the unmodified
model or the masked-full oracle) or refused with an error that names what is missing."""

from __future__ import annotations

import math
import os
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kvpass
from kvpass.errors import UnsupportedModelError
from kvpass.eval.coverage import greedy, masked_full_oracle_mismatch, prefill

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb  # noqa: E402


def tiny_llama(**config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        num_hidden_layers=2, intermediate_size=128, vocab_size=128,
                                        **config)).eval()


def prompt(length: int = 28) -> torch.Tensor:
    return torch.randint(3, 120, (1, length), generator=torch.Generator().manual_seed(1))


# --- capture and discovery --------------------------------------------------------------------------

def test_keyword_example_inputs_capture_like_positional_ones() -> None:
    report = kvpass.find_attention(tiny_llama(), input_ids=torch.arange(1, 9)[None])
    assert report.capture == "torch.export"  # the cache object is kept out of the outputs either way
    assert [(s.name, s.num_heads, s.num_kv_heads) for s in report] == [
        (f"model.layers.{i}.self_attn", 4, 2) for i in range(2)]


def test_multimodal_config_without_vocab_size_makes_inputs_from_its_text_config() -> None:
    from kvpass.capture import default_example_inputs

    holder = nn.Module()
    holder.config = transformers.Gemma3Config(text_config={"vocab_size": 77})
    assert not hasattr(holder.config, "vocab_size") or holder.config.vocab_size is None
    (ids,), kwargs = default_example_inputs(holder)
    assert int(ids.max()) < 77 and kwargs == {"use_cache": False}


class FoldedAlibi(nn.Module):
    """Bloom-style: one fused QKV projection, batch and heads folded into one dim, ALiBi via baddbmm."""

    def __init__(self, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(heads * head_dim, 3 * heads * head_dim)
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, self.heads, 3, self.head_dim).unbind(3)
        fold = lambda t: t.transpose(1, 2).reshape(batch * self.heads, length, self.head_dim)  # noqa: E731
        alibi = (self.slopes[:, None] * torch.arange(length)[None, :]).repeat(batch, 1)[:, None, :]
        scores = torch.baddbmm(alibi, fold(q), fold(k).transpose(1, 2), alpha=self.head_dim**-0.5)
        blocked = torch.ones(length, length, dtype=torch.bool).triu(1)
        out = torch.bmm(scores.masked_fill(blocked, float("-inf")).softmax(-1), fold(v))
        return out.view(batch, self.heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1)


def test_heads_folded_into_the_batch_count_heads_not_batch_times_heads() -> None:
    report = kvpass.find_attention(FoldedAlibi(), torch.randn(3, 6, 32))
    assert [(s.num_heads, s.num_kv_heads, s.head_dim, s.causal, s.masked) for s in report] == [(4, 4, 8, True, True)]
    assert report[0].scale == pytest.approx(8**-0.5)


class AroundSoftmax(nn.Module):
    """Causal attention with one of the ops real models put around the softmax."""

    def __init__(self, form: str, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.form, self.heads, self.head_dim = form, heads, head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(heads * head_dim, heads * head_dim)
                                                              for _ in range(4))
        self.sinks = nn.Parameter(torch.randn(heads))
        self.head_scale = nn.Parameter(torch.rand(heads) + 0.5)
        self.register_buffer("bias", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        split = lambda t: t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        keep = torch.ones(length, length, dtype=torch.bool).tril()
        if self.form == "softcap":
            scores = torch.tanh(scores / 30.0) * 30.0
        elif self.form == "head_scale":
            scores = scores * self.head_scale[None, :, None, None]
        elif self.form == "clamp":
            scores = torch.max(scores + torch.where(keep, 0.0, torch.finfo(scores.dtype).min),
                               torch.tensor(torch.finfo(scores.dtype).min))
        elif self.form == "multiplicative":
            mask = self.bias[:, :, :length, :length]
            scores = scores * mask + -1e4 * (1 - mask)
        if self.form == "masked_fill_":
            scores.masked_fill_(~keep, float("-inf"))
        elif self.form not in ("clamp", "multiplicative"):
            scores = scores.masked_fill(~keep, float("-inf"))
        if self.form == "sinks":
            combined = torch.cat([scores, self.sinks.reshape(1, -1, 1, 1).expand(batch, -1, length, 1)], dim=-1)
            probs = (combined - combined.max(dim=-1, keepdim=True).values).softmax(-1)[..., :-1]
        elif self.form == "differential":
            q2, k2 = split(self.q_proj(x) * 0.5), split(self.k_proj(x) * 0.5)
            second = (q2 @ k2.transpose(-1, -2)).masked_fill(~keep, float("-inf")).softmax(-1)
            probs = scores.softmax(-1) - 0.5 * second
        else:
            probs = scores.softmax(-1)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(batch, length, -1))


@pytest.mark.parametrize(("form", "logit_ops"), [
    ("softcap", ["softcap"]), ("sinks", ["sinks"]), ("head_scale", ["tensor_factor"]), ("clamp", ["clamp"]),
    ("multiplicative", ["tensor_factor"]), ("masked_fill_", []),
])
def test_ops_around_the_softmax_are_sites_that_name_them(form: str, logit_ops: list[str]) -> None:
    report = kvpass.find_attention(AroundSoftmax(form), torch.randn(2, 6, 32))
    assert [(s.num_heads, s.head_dim, s.causal, s.logit_ops) for s in report] == [(4, 8, True, logit_ops)]
    assert report[0].scale == pytest.approx(8**-0.5) and not report.unsupported


def test_differential_attention_is_reported_by_name_never_as_no_attention() -> None:
    report = kvpass.find_attention(AroundSoftmax("differential"), torch.randn(2, 6, 32))
    assert len(report) == 0 and len(report.unsupported) == 2
    assert all("differential attention" in u.reason for u in report.unsupported)


def test_unknown_ops_between_scores_and_softmax_are_listed_not_dropped() -> None:
    class Periodic(AroundSoftmax):
        def forward(self, x):
            q = k = self.q_proj(x).view(1, -1, 4, 8).transpose(1, 2)
            return (torch.sin(q @ k.transpose(-1, -2)).softmax(-1) @ k).sum()

    report = kvpass.find_attention(Periodic("plain"), torch.randn(1, 6, 32))
    assert len(report) == 0 and [u.reason for u in report.unsupported] == [
        "softmax over q·kᵀ through ops kvpass does not model: sin"]


class SharedTwice(nn.Module):
    """One attention module run twice per forward (weights shared across two 'layers')."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = AroundSoftmax("plain")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.attn(x))


def test_a_module_run_twice_is_counted_and_refused_with_why() -> None:
    model, x = SharedTwice(), torch.randn(1, 6, 32)
    report = kvpass.find_attention(model, x)
    assert [s.name for s in report] == ["attn", "attn"]
    with pytest.raises(UnsupportedModelError, match=r"\['attn'\].*several attentions per forward"):
        kvpass.optimize(model, budget=1.0, example_inputs=(x,))


class LatentAttention(nn.Module):
    """Multi-head latent attention: K and V decompressed from a low-rank latent of the hidden states."""

    def __init__(self, hidden: int = 32, heads: int = 4, head_dim: int = 8, rank: int = 8) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim)
        self.kv_down, self.norm = nn.Linear(hidden, rank), nn.LayerNorm(rank)
        self.kv_up = nn.Linear(rank, 2 * heads * head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        split = lambda t: t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        k, v = self.kv_up(self.norm(self.kv_down(x))).chunk(2, dim=-1)
        out = nn.functional.scaled_dot_product_attention(split(self.q_proj(x)), split(k), split(v), is_causal=True)
        return out.transpose(1, 2).reshape(batch, length, -1)


def test_latent_attention_is_refused_by_name_not_called_cross_attention() -> None:
    report = kvpass.find_attention(LatentAttention(), torch.randn(1, 6, 32))
    assert len(report) == 0 and "latent attention" in report.unsupported[0].reason


# --- explicit-cache decoders ----------------------------------------------------------------------

class AbsolutePositionDecoder(nn.Module):
    """A GPT-2-style decoder carrying its cache: positions enter as a learned embedding, and the causal
    mask is derived from the cache length (`ones(T, S).tril(S - T)`), valid however short the cache is."""

    def __init__(self, vocab: int = 32, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.tokens, self.positions = nn.Embedding(vocab, hidden), nn.Embedding(128, hidden)
        self.qkv = nn.ModuleList(nn.Linear(hidden, 3 * hidden) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(2))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, position_ids, past_keys, past_values):
        x = self.tokens(input_ids) + self.positions(position_ids)
        batch, length, _ = x.shape
        keys, values = [], []
        for qkv, out, past_k, past_v in zip(self.qkv, self.out, past_keys, past_values):
            q, k, v = (t.view(batch, length, self.heads, self.head_dim).transpose(1, 2) for t in qkv(x).chunk(3, -1))
            k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
            total = k.shape[-2]
            keep = torch.ones(length, total, dtype=torch.bool).tril(total - length)
            scores = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).masked_fill(~keep, float("-inf"))
            x = x + out((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1))
            keys.append(k)
            values.append(v)
        return self.head(x), tuple(keys), tuple(values)


def test_explicit_cache_decoder_with_cache_length_mask_and_absolute_positions_is_supported() -> None:
    torch.manual_seed(0)
    model, past = AbsolutePositionDecoder().eval(), 40
    cache = lambda: tuple(torch.randn(1, 4, past, 8) for _ in range(2))  # noqa: E731
    inputs = (torch.tensor([[5, 6, 7]]), torch.arange(past, past + 3)[None], cache(), cache())
    rewritten = kvpass.optimize(model, budget=0.5, method="knorm", example_inputs=inputs, sinks=2, recent=4)
    with torch.no_grad():
        logits, keys, _ = rewritten(*inputs)
        reference, full_keys, _ = model(*inputs)
    torch.testing.assert_close(logits, reference)  # eviction comes after this step's attention
    assert [k.shape[-2] for k in full_keys] == [43, 43] and all(k.shape[-2] <= 21 for k in keys)


def test_explicit_cache_decoder_whose_positions_are_not_an_input_is_refused() -> None:
    model, past = AbsolutePositionDecoder().eval(), 40
    cache = lambda: tuple(torch.randn(1, 4, past, 8) for _ in range(2))  # noqa: E731
    inputs = (torch.tensor([[5]]), torch.tensor([[7]]), cache(), cache())  # positions do not follow the cache
    with pytest.raises(UnsupportedModelError, match="positions must be an explicit input"):
        kvpass.optimize(model, budget=0.5, example_inputs=inputs)


def test_explicit_cache_rewrite_that_cannot_reproduce_the_step_is_refused() -> None:
    class WithBias(AbsolutePositionDecoder):  # an ALiBi-like bias the explicit-cache rewrite does not carry
        def forward(self, input_ids, position_ids, past_keys, past_values):
            x = self.tokens(input_ids) + self.positions(position_ids)
            batch, length, _ = x.shape
            keys, values = [], []
            for qkv, out, past_k, past_v in zip(self.qkv, self.out, past_keys, past_values):
                q, k, v = (t.view(batch, length, 4, 8).transpose(1, 2) for t in qkv(x).chunk(3, -1))
                k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
                bias = -0.5 * torch.arange(k.shape[-2]).flip(0).float()
                x = x + out(((q @ k.transpose(-1, -2) + bias).softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1))
                keys.append(k)
                values.append(v)
            return self.head(x), tuple(keys), tuple(values)

    inputs = (torch.tensor([[5]]), torch.tensor([[20]]), *(tuple(torch.randn(1, 4, 20, 8) for _ in range(2)),) * 2)
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        kvpass.optimize(WithBias().eval(), budget=0.5, example_inputs=inputs)


# --- Hugging Face runtime ----------------------------------------------------------------------------

class ToyAttention(LlamaAttention):
    """Llama attention with a variation real models have (`variant`): its cache under another keyword,
    kept out of reach, or of a class of its own; a bias added to the model's mask; a causal mask on a
    module that says it is not causal; a per-head scale inside its own eager attention; a mask helper
    that knows only eager and SDPA."""

    variant = ""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None,
                layer_past=None, **kwargs):
        cache = next((given for given in (cache, past_key_values, layer_past) if given is not None), None)
        cache = getattr(self, "stash", cache) if self.variant == "hidden_cache" else cache
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        length, total = q.shape[-2], k.shape[-2]
        if self.variant in ("bias", "not_causal"):
            total = cache.get_seq_length() if cache is not None else total
            distance = torch.arange(total - length, total)[:, None] - torch.arange(total)[None, :]
            causal = distance >= 0
            attention_mask = (causal if self.variant == "not_causal" else
                              torch.where(causal, -0.05 * distance.float(), float("-inf")))[None, None]
        if self.variant == "mask_helper":  # its helper knows eager and SDPA only, and returns None otherwise
            causal = torch.ones(length, total, dtype=torch.bool).tril(total - length)[None, None]
            helper = {"sdpa": causal, "eager": causal}.get(self.config._attn_implementation)
            attention_mask = helper[:, :, :, :total]
        implementation = self.config._attn_implementation
        function = scaled_eager if implementation == "eager" else transformers.AttentionInterface._global_mapping[
            implementation]
        out, _ = function(self, q, k, v, attention_mask, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), None


def scaled_eager(module, query, key, value, attention_mask, scaling, **kwargs):
    """The toy's own eager attention: a per-head scale on the logits that SDPA-style kernels do not have."""
    out, _ = sdpa_attention_forward(module, query * (1 + torch.arange(query.shape[1]) / 4)[None, :, None, None],
                                    key, value, attention_mask, scaling=scaling)
    return out, None


class Rewired(nn.Module):
    """Calls the attention module the way some models do: with the cache as `layer_past=`, out of reach,
    replaced by a cache class of the model's own, or twice per layer."""

    def __init__(self, attention: ToyAttention, how: str) -> None:
        super().__init__()
        self.inner, self.how = attention, how

    def forward(self, cache=None, past_key_values=None, **kwargs):  # `cache=` from transformers 5.24 on
        past_key_values = cache if cache is not None else past_key_values
        if self.how == "layer_past":
            return self.inner(layer_past=past_key_values, **kwargs)
        if self.how == "hidden_cache":
            self.inner.stash = past_key_values
            return self.inner(**kwargs)
        if self.how == "own_cache":
            return self.inner(past_key_values=OwnCache() if past_key_values is not None else None, **kwargs)
        raise ValueError(self.how)


class OwnCache:
    """A cache class of the model's own, with no transformers cache layers."""

    def update(self, k, v, layer):
        return k, v


def toy_llama(variant: str = "", how: str = "", implementation: str = "sdpa") -> LlamaForCausalLM:
    model = tiny_llama(attn_implementation=implementation)
    for layer in model.model.layers:
        layer.self_attn.__class__ = ToyAttention
        layer.self_attn.variant = variant
        layer.self_attn.is_causal = variant != "not_causal"
        if how:
            layer.self_attn = Rewired(layer.self_attn, how)
    return model


def copy_of(model):
    import copy

    return copy.deepcopy(model)


def assert_exact_and_pruned(base, method: str = "tova"):
    """Budget 1.0 gives the unmodified model's tokens; budget 0.5 halves the prefill cache and decodes
    as the masked-full oracle does. Returns the sites kvpass found."""
    ids = prompt()
    model = kvpass.optimize(copy_of(base), budget=1.0)
    assert torch.equal(greedy(model, ids, steps=4), greedy(base, ids, steps=4))
    pruned = kvpass.optimize(model, budget=0.5, method=method, sinks=2, recent=4)  # re-planned, not re-captured
    assert kvpass.cache_bytes(prefill(pruned, ids)) <= 0.5 * kvpass.cache_bytes(prefill(base, ids))
    assert masked_full_oracle_mismatch(base, pruned, ids, steps=4) == ""
    return pruned.kvpass_sites


def test_cache_passed_as_layer_past_is_adopted_and_pruned() -> None:
    assert_exact_and_pruned(toy_llama(how="layer_past"))


@pytest.mark.parametrize(("how", "message"), [
    ("hidden_cache", "does not hand its cache"),
    ("own_cache", "OwnCache is not supported"),
])
def test_a_cache_kvpass_cannot_adopt_is_refused_not_left_full(how: str, message: str) -> None:
    model = toy_llama(how=how)
    with pytest.raises(UnsupportedModelError, match=message):
        kvpass.optimize(model, budget=0.5)
    assert model.config._attn_implementation == "sdpa"  # left as it was


def test_custom_additive_mask_is_honoured_at_the_kept_slots() -> None:
    assert_exact_and_pruned(toy_llama(variant="bias"))


def test_causality_carried_only_by_the_mask_of_a_module_that_says_not_causal() -> None:
    assert_exact_and_pruned(toy_llama(variant="not_causal"))


def test_attention_kvpass_does_not_reproduce_is_refused_before_it_changes_tokens() -> None:
    model = toy_llama(implementation="eager")
    with pytest.raises(UnsupportedModelError, match="does not reproduce model.layers.0.self_attn"):
        kvpass.optimize(model, budget=1.0)


def test_model_code_failing_under_the_kvpass_implementation_is_a_kvpass_error_naming_the_model() -> None:
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM fails when its attention runs through kvpass"):
        kvpass.optimize(toy_llama(variant="mask_helper"), budget=0.5)


def test_legacy_tuple_cache_is_refused_by_name() -> None:
    from kvpass.runtime.hf import _adopt_cache_layer, BINDING_ATTRIBUTE

    module = nn.Module()
    setattr(module, BINDING_ATTRIBUTE, type("Binding", (), {"site": type("Site", (), {"name": "attn"})})())
    with pytest.raises(UnsupportedModelError, match="legacy tuple caches"):
        _adopt_cache_layer(module, (), {"layer_past": (torch.zeros(1), torch.zeros(1))})


# --- sliding-window and hybrid models -------------------------------------------------------------

def hybrid(family: str, layer_types: list[str] | None, window: int = 8):
    """A tiny sliding-window model: its window is smaller than the prompts, so sliding layers drop tokens."""
    sizes = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                 vocab_size=128, num_hidden_layers=len(layer_types or [0, 0]), sliding_window=window)
    config = {
        "mistral": lambda: transformers.MistralConfig(**sizes),
        "gemma3": lambda: transformers.Gemma3TextConfig(**sizes, layer_types=layer_types),
        "gpt_oss": lambda: transformers.GptOssConfig(**sizes, layer_types=layer_types, num_local_experts=4,
                                                     num_experts_per_tok=2),
        "qwen2": lambda: transformers.Qwen2Config(**sizes, layer_types=layer_types, use_sliding_window=True),
    }[family]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(("family", "layer_types"), [
    ("mistral", None),                                                              # every layer sliding
    ("gemma3", ["sliding_attention"] * 2 + ["full_attention"]),                     # sliding-heavy hybrid
    ("gpt_oss", ["sliding_attention", "full_attention"]),                           # alternating, sink logits
])
def test_sliding_window_and_hybrid_models_are_pruned_within_the_global_cap(family, layer_types) -> None:
    sites = assert_exact_and_pruned(hybrid(family, layer_types))
    expected = [7 if kind != "full_attention" else None for kind in (layer_types or ["sliding_attention"] * 2)]
    assert [site.window for site in sites] == expected  # a window of 8 keeps the 7 tokens before the new one


def test_sliding_window_value_with_only_full_attention_layers_is_not_windowed() -> None:
    base = hybrid("qwen2", ["full_attention", "full_attention"])
    pruned, ids = kvpass.optimize(copy_of(base), budget=0.5), prompt()
    assert [site.window for site in pruned.kvpass_sites] == [None, None]
    assert kvpass.cache_bytes(prefill(pruned, ids)) <= 0.5 * kvpass.cache_bytes(prefill(base, ids))


@settings(max_examples=40, deadline=None)
@given(budget=st.floats(0.05, 0.95), windows=st.lists(st.integers(1, 64), min_size=1, max_size=4),
       full=st.integers(1, 4), evict_every=st.integers(1, 4))
def test_hybrid_schedules_hold_the_global_cap_at_every_length(budget, windows, full, evict_every) -> None:
    """Windowed sites kept whole when the full sites can pay for it, every site at its fraction
    otherwise: what all sites may hold never exceeds the budget of what the unmodified model holds."""
    from kvpass.methods import get_method
    from kvpass.planning import build_plan
    from kvpass.site import AttentionSite

    sites = [AttentionSite(f"w{i}", i, 4, 2, 16, None, True, window=w) for i, w in enumerate(windows)]
    sites += [AttentionSite(f"f{i}", len(windows) + i, 4, 2, 16, None, True) for i in range(full)]
    plan = build_plan(sites, budget, get_method("tova"), sinks=2, recent=4, evict_every=evict_every)
    schedules = [plan.schedule(site, 4) for site in sites]
    for seen in range(1, 200):
        held = sum(min(s.cap(seen), s.full(seen)) * (s.kv_bytes_per_token + s.state_bytes_per_token)
                   for s in schedules)
        assert held <= Fraction(budget) * sum(s.full(seen) * s.kv_bytes_per_token for s in schedules)
