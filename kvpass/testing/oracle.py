"""`assert_oracle`: decoding over the compacted cache equals the full model with the evicted keys masked.

This is the exact meaning of eviction (DESIGN invariant 2): a pruned model must compute what the
unmodified model computes when every attention of a decode step may see only the tokens the
pruned cache still holds, per layer and per KV head, at their original positions. The oracle runs
the unmodified model on its full cache through an attention function that masks, in each layer
and head, the keys the pruned cache no longer holds; anything else (wrong positions after
compaction, keys gathered apart from their slots, a stale statistic) shows as a difference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from kvpass.runtime.call_arguments import cache_argument
from kvpass.testing.decoding import distinct_prompt, is_hf_causal_lm

ORACLE = "kvpass_masked_oracle"


def assert_oracle(model: torch.nn.Module, method: Any = None, budget: float | str = 0.5, *, prompt_len: int = 64,
                  steps: int = 8, prompt: torch.Tensor | None = None, atol: float = 1e-5, sinks: int = 4,
                  recent: int = 8, **method_options: Any) -> None:
    """Assert a Hugging Face causal LM optimized with eviction `method` at `budget` decodes exactly like
    the unmodified model with the keys it evicted masked out.

    The optimized copy decodes `steps` greedy tokens after a prompt of `prompt_len` distinct tokens
    (or `prompt`); before each step, every layer's kept slots become that layer's (and head's)
    visibility mask in the unmodified model. The prompt's own logits must match too (eviction
    never changes the prefill's outputs). A small `recent` window (8) lets eviction reach
    tokens the next steps would otherwise see anyway.

    Example:
        >>> assert_oracle(model, "tova", budget=0.3)                # doctest: +SKIP
        >>> assert_oracle(model, "snapkv", budget=0.5, window=16)   # doctest: +SKIP
    """
    import kvpass
    from transformers import DynamicCache

    from kvpass.hf_attention import attention_implementation

    if not is_hf_causal_lm(model):
        raise TypeError(f"assert_oracle needs a Hugging Face causal LM (it masks through transformers' attention "
                        f"interface), got {type(model).__name__}")
    pruned = kvpass.optimize(copy.deepcopy(model), budget=budget, method=method, sinks=sinks, recent=recent,
                             **method_options)
    reference = copy.deepcopy(model)
    ids = prompt if prompt is not None else distinct_prompt(model, prompt_len)
    pruned_cache, full_cache = DynamicCache(config=pruned.config), DynamicCache(config=reference.config)
    visible: dict[str, torch.Tensor] = {}
    layer_of = {reference.get_submodule(site.name): site.name for site in pruned.kvpass_sites}
    with torch.no_grad():
        logits = pruned(ids, **cache_argument(pruned, pruned_cache), use_cache=True).logits[:, -1]
        expected = reference(ids, **cache_argument(reference, full_cache), use_cache=True).logits[:, -1]
        _compare(logits, expected, atol, "the prompt's own logits (eviction must not change them)", pruned_cache)
        for step in range(steps):
            seen = pruned_cache.get_seq_length()
            visible.update({layer.site.name: _visible(layer.site_cache, seen) for layer in pruned_cache.layers})
            token = logits.argmax(-1, keepdim=True)
            logits = pruned(token, **cache_argument(pruned, pruned_cache), use_cache=True).logits[:, -1]
            with attention_implementation(reference, ORACLE, _masked_attention(layer_of, visible)):
                expected = reference(token, **cache_argument(reference, full_cache), use_cache=True,
                                     position_ids=torch.full_like(token, seen)).logits[:, -1]
            _compare(logits, expected, atol, f"decode step {step} ({seen} tokens seen)", pruned_cache)


def _visible(site_cache: Any, seen: int) -> torch.Tensor:
    """bool [B, Hkv, seen + 1]: the slots a layer's cache holds, plus the token being decoded."""
    keys = site_cache.keys
    batch, heads, held = keys.shape[:3]
    mask = torch.zeros(batch, heads, seen + 1, dtype=torch.bool, device=keys.device)
    slots = site_cache.slots if site_cache.slots is not None else torch.arange(held, device=keys.device).expand(
        batch, heads, held)
    mask.scatter_(-1, slots.long(), True)  # the kit's prompts are unpadded: every slot is >= 0
    mask[..., seen] = True
    return mask


def _masked_attention(layer_of: dict[torch.nn.Module, str], visible: dict[str, torch.Tensor]) -> Callable:
    """An attention function over the full cache that lets each KV head see only its `visible` keys."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        group = query.shape[1] // key.shape[1]
        allowed = visible[layer_of[module]].repeat_interleave(group, dim=1)[:, :, None, :]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = query.float() @ key.repeat_interleave(group, dim=1).float().transpose(-1, -2) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = probs @ value.repeat_interleave(group, dim=1).float()
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


def _compare(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str, cache: Any) -> None:
    difference = float((actual - expected).abs().max())
    if difference > atol:
        held = ", ".join(f"{layer.site.name} keeps {layer.keys.shape[-2]}" for layer in cache.layers)
        raise AssertionError(f"{what}: the optimized model's logits differ from the unmodified model with the evicted "
                             f"keys masked by {difference:.3g} (atol {atol:g}); tokens held: {held}")
