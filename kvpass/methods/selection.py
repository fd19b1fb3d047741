"""Shared keep-set selection: padding out, sinks and recent window in, pages whole.

Every method only scores tokens; this module turns scores into the final ranking the
compaction kernel uses, so the carve-outs behave the same for every method and in both
graph worlds.
"""

from __future__ import annotations

import torch

from kvpass.methods.base import Method, Observation

PROTECTED = float("inf")
EVICT_FIRST = float("-inf")


def ranking_scores(method: Method, obs: Observation, sinks: int, recent: int) -> torch.Tensor:
    """Scores [B, Hkv, T] ready for top-k: protected tokens +inf, padding -inf.

    `sinks` counts the first tokens of the sequence, `recent` the latest ones; both are
    protected but still count inside the budget (the caller sizes `keep` accordingly).
    """
    scores = method.score(obs).float()
    if not method.per_head:
        scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
    if method.span > 0:
        scores = _span_max(scores, method.span)
    if method.page_size > 1:
        scores = _page_means(scores, obs.slots, method.page_size)
    slots = obs.slots
    protected = (slots >= 0) & ((slots < sinks) | (slots >= obs.seen - recent))
    scores = torch.where(protected, PROTECTED, scores)
    return torch.where(slots < 0, EVICT_FIRST, scores)


def _span_max(scores: torch.Tensor, span: int) -> torch.Tensor:
    """Each token takes the best score within `span` tokens either side (cache order = slot order).

    A max over shifted copies rather than `max_pool1d`, whose output-size arithmetic pins the
    cache length under torch.compile with dynamic shapes (one recompilation per length)."""
    tokens = scores.shape[-1]
    padded = torch.nn.functional.pad(scores, (span, span), value=EVICT_FIRST)
    return torch.stack([padded[..., shift:shift + tokens] for shift in range(2 * span + 1)]).amax(dim=0)


def _page_means(scores: torch.Tensor, slots: torch.Tensor, page_size: int) -> torch.Tensor:
    """Give every token the mean score of its page, so pages rank (and leave) as a whole."""
    pages = slots.clamp_min(0).long() // page_size
    num_pages = int(pages.max()) + 1 if pages.numel() else 1
    sums = torch.zeros(*scores.shape[:-1], num_pages, device=scores.device).scatter_add_(-1, pages, scores)
    counts = torch.zeros_like(sums).scatter_add_(-1, pages, torch.ones_like(scores))
    return torch.gather(sums / counts.clamp_min(1), -1, pages)
