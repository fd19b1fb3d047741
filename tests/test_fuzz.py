"""Fuzzing the runtime against its oracle: decoding over the compacted cache equals the unmodified
model attending over its full cache with each row's evicted keys masked out.

Hypothesis draws a tiny decoder (query heads, KV heads, head dim, layers) and, for it, several
generations (method, budget, sinks, recent window, `evict_every`, batch size, left padding per
row, the prompt in one or two chunks, position ids given or derived from the cache length). Each
runs in lock step on both models: before every call the oracle reads, per layer, batch row and
KV head, which slots the compacted cache still holds, and masks every other earlier key of the
full cache. Logits must agree at every real position of every call, and the compacted cache must
stay within its byte budget of the full one.

Each of these breakages of the runtime made it fail (tried once each): the cache reporting its
physical instead of its logical length, padding ignored, padding of tokens appended after an
eviction ignored, query slots off by one, an eviction keeping one token too many.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvpass
from kvpass.hf_attention import attention_implementation
from kvpass.runtime.call_arguments import cache_argument

VOCAB, DECODE_STEPS = 96, 5


@st.composite
def decoders(draw) -> LlamaForCausalLM:
    kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    heads = kv_heads * group
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, num_hidden_layers=draw(st.integers(1, 3)), intermediate_size=48,
                         vocab_size=VOCAB, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    for parameter in model.parameters():  # sharper attention than the default init: evictions matter
        parameter.data *= 3
    return model


runs = st.fixed_dictionaries({
    "method": st.sampled_from(sorted(kvpass.METHODS)),
    "budget": st.floats(0.15, 1.0),
    "sinks": st.integers(0, 4),
    "recent": st.integers(0, 8),
    "evict_every": st.integers(1, 4),
    "length": st.integers(6, 40),
    "padding": st.lists(st.floats(0.0, 0.9), min_size=1, max_size=3),  # share of each row that is padding
    "prefill_chunks": st.integers(1, 2),
    "explicit_positions": st.booleans(),
    "seed": st.integers(0, 2**16),
})
"""One generation: eviction settings, the prompt (length, left padding per batch row, fed in one
or two chunks), and whether position ids are passed or left to the model (from the cache's
logical length)."""


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(base=decoders(), generations=st.lists(runs, min_size=3, max_size=3))
def test_decoding_on_the_compacted_cache_equals_the_masked_full_model(base, generations) -> None:
    """Several generations per drawn model: the first optimizes a copy, the next re-optimize it
    (replacing the plan), so one graph capture serves them all."""
    pruned = None
    for run in generations:
        pruned = kvpass.optimize(pruned if pruned is not None else _copy(base), budget=run["budget"],
                                 method=run["method"], sinks=run["sinks"], recent=run["recent"],
                                 evict_every=run["evict_every"])
        _check_run(base, pruned, run)


def _copy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    clone = LlamaForCausalLM(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def _check_run(base, pruned, run) -> None:
    generator = torch.Generator().manual_seed(run["seed"])
    batch, length = len(run["padding"]), run["length"]
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, share in enumerate(run["padding"]):
        pad = int(share * length)
        ids[row, :pad], mask[row, :pad] = 0, 0
    compact, full = DynamicCache(config=pruned.config), DynamicCache(config=base.config)
    visible: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, seen] keys the oracle may see (none: all)
    split = length // 2 if run["prefill_chunks"] == 2 else length
    prompt_chunks = [ids[:, :split], ids[:, split:]] if 0 < split < length else [ids]
    whole_mask = torch.cat([mask, torch.ones(batch, DECODE_STEPS, dtype=torch.long)], dim=1)
    seen = 0
    for step in range(len(prompt_chunks) + DECODE_STEPS):
        chunk = prompt_chunks[step] if step < len(prompt_chunks) else got[:, -1:].argmax(-1)
        seen += chunk.shape[1]
        step_mask = whole_mask[:, :seen]
        inputs = {"attention_mask": step_mask, "use_cache": True}
        if run["explicit_positions"]:
            inputs["position_ids"] = (step_mask.cumsum(-1) - 1).clamp_min(0)[:, -chunk.shape[1]:]
        with torch.no_grad():
            got = pruned(chunk, **cache_argument(pruned, compact), **inputs).logits
            with attention_implementation(base, "kvpass_fuzz_oracle", _masked_attention(visible, step_mask)):
                expected = base(chunk, **cache_argument(base, full), **inputs).logits
        real = step_mask[:, -chunk.shape[1]:].bool()
        torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"step {step} of {run}: {m}")
        assert kvpass.cache_bytes(compact) <= run["budget"] * kvpass.cache_bytes(full), \
            f"step {step} of {run}: {kvpass.cache_bytes(compact)} bytes > budget x {kvpass.cache_bytes(full)}"
        visible = {index: _kept(layer, seen) for index, layer in enumerate(compact.layers)}


def _kept(layer, seen: int) -> torch.Tensor:
    """[B, Hkv, seen] True for every slot the compacted layer holds, after `seen` tokens."""
    cache = layer.site_cache
    batch, kv_heads, held = cache.keys.shape[:3]
    slots = cache.slots if cache.slots is not None else torch.arange(held).expand(batch, kv_heads, held)
    kept = torch.zeros(batch, kv_heads, seen + 1, dtype=torch.bool)  # a spare column takes padding (slot < 0)
    kept.scatter_(-1, torch.where(slots >= 0, slots.long(), seen), True)
    return kept[..., :seen]


def _masked_attention(visible: dict[int, torch.Tensor], mask: torch.Tensor):
    """Eager attention over the full cache: causal, padding keys hidden (a padding query sees
    itself, so it stays finite), and in each layer only the keys `visible` names plus the ones
    this call appends."""
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        group = query.shape[1] // key.shape[1]
        queries, keys = query.shape[2], key.shape[2]
        logits = (query.float() @ key.float().repeat_interleave(group, 1).transpose(-1, -2)) * scaling
        key_index, query_index = torch.arange(keys), torch.arange(keys - queries, keys)
        allowed = (key_index[None, :] <= query_index[:, None])[None, None] & mask.bool()[:, None, None, :]
        allowed = allowed | (key_index[None, :] == query_index[:, None])[None, None]
        kept = visible.get(module.layer_idx)
        if kept is not None:  # what the compacted cache held before this call, and every key appended now
            kept = torch.cat([kept, kept.new_ones(*kept.shape[:2], keys - kept.shape[-1])], dim=-1)
            allowed = allowed & kept.repeat_interleave(group, 1)[:, :, None, :]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        out = probs @ value.float().repeat_interleave(group, 1)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention
