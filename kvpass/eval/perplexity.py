"""Perplexity on held-out text, with the context's cache evicted before the continuation is read.

Protocol: the held-out split of the corpus is cut into windows of `context + continuation`
tokens. The context is prefilled once (shared by every plan), evicted under a plan, and the
continuation is then read in one forward pass over the pruned cache; perplexity is
exp(mean negative log-likelihood) of the continuation's tokens (each predicted from the
tokens before it). The full cache is the plan at budget 1.0; a method's cost is its
perplexity relative to that.
"""

from __future__ import annotations

import math

import torch

from kvpass.runtime.call_arguments import cache_argument
from kvpass.eval import corpus
from kvpass.eval.sweep import cache_from_recording, record_prefill


def windows(tokenizer, tokens: int, count: int | None = None, split: str = "perplexity") -> list[torch.Tensor]:
    """Consecutive, non-overlapping [1, tokens] windows of the `split` text (the last partial one dropped).

    Example:
        >>> [w.shape[-1] for w in windows(tokenizer, 1024, count=2)]   # doctest: +SKIP
        [1024, 1024]
    """
    if tokens < 2:
        raise ValueError(f"tokens must be at least 2, got {tokens}")
    ids = tokenizer(corpus.text(split), add_special_tokens=False, return_tensors="pt").input_ids
    available = ids.shape[-1] // tokens
    if count is not None and count > available:
        raise ValueError(f"count={count}: the {split!r} split holds only {available} windows of {tokens} tokens")
    return [ids[:, i * tokens:(i + 1) * tokens] for i in range(count if count is not None else available)]


def perplexities(model, windows: list[torch.Tensor], context: int, plans: dict) -> dict[str, float]:
    """label -> perplexity of the windows' continuations, with the first `context` tokens of each
    window in the cache under that label's plan (a `Plan` of optimized `model`).

    Example:
        >>> plans = {"full": kvpass.plan(model, 1.0), "tova@0.5": kvpass.plan(model, 0.5, "tova")}  # doctest: +SKIP
        >>> perplexities(model, windows(tokenizer, 1024, 4), 768, plans)                       # doctest: +SKIP
        {'full': 14.2, 'tova@0.5': 15.0}
    """
    if not windows:
        raise ValueError("windows is empty")
    if not 0 < context < windows[0].shape[-1] - 1:
        raise ValueError(f"context={context} must leave at least 2 tokens of each {windows[0].shape[-1]}-token window")
    totals = {label: 0.0 for label in plans}
    count = 0
    for window in windows:
        recording = record_prefill(model, window[:, :context])
        continuation = window[:, context:]
        for label, plan in plans.items():
            cache = cache_from_recording(model, recording, plan)
            with torch.no_grad():
                logits = model(continuation, **cache_argument(model, cache), use_cache=True).logits
            totals[label] += negative_log_likelihood(logits[:, :-1], continuation[:, 1:])
        count += continuation.shape[-1] - 1
    return {label: math.exp(total / count) for label, total in totals.items()}


def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL (nats) of `targets` [1, T] under `logits` [1, T, V]."""
    return torch.nn.functional.cross_entropy(logits[0].float(), targets[0], reduction="sum").item()
