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
    slots = obs.slots
    scores = method.score(obs).float()
    if method.shared_keep_set:
        scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
    # Padding is out before pooling too: its keys are whatever the model made of pad tokens (which
    # differs between runtimes), and must not lend their scores to real neighbours.
    scores = torch.where(slots < 0, EVICT_FIRST, scores)
    if method.span > 0:
        scores = _span_max(scores, method.span)
    if method.page_size > 1:
        scores = _page_means(scores, slots, method.page_size)
    protected = (slots >= 0) & ((slots < sinks) | (slots >= obs.seen - recent))
    scores = torch.where(protected, PROTECTED, scores)
    return torch.where(slots < 0, EVICT_FIRST, scores)


def _span_max(scores: torch.Tensor, span: int) -> torch.Tensor:
    """Each token takes the best score within `span` tokens either side (cache order = slot order).

    A max over sliding windows of the -inf-padded scores (`unfold`), which keeps the cache
    length symbolic when exported to ONNX (max_pool1d specialises it)."""
    padded = torch.nn.functional.pad(scores, (span, span), value=float("-inf"))
    return padded.unfold(-1, 2 * span + 1, 1).amax(-1)


def _page_means(scores: torch.Tensor, slots: torch.Tensor, page_size: int) -> torch.Tensor:
    """Give every token the mean score of its page, so pages rank (and leave) as a whole.

    The cache is in slot order, so a page's tokens are contiguous: numbering the runs of equal
    page ids gives segment ids below the cache length, with no data-dependent size (the same
    code exports to ONNX). Padding (negative slots) shares page 0 with the first real tokens but
    counts in no page's mean."""
    pages = slots.clamp_min(0) // page_size
    starts = torch.nn.functional.pad((pages[..., 1:] != pages[..., :-1]).long(), (1, 0))
    segments = starts.cumsum(-1)
    real = slots >= 0
    sums = torch.zeros_like(scores).scatter_add(-1, segments, torch.where(real, scores, 0.0))
    counts = torch.zeros_like(scores).scatter_add(-1, segments, real.float())
    return torch.gather(sums / counts.clamp_min(1), -1, segments)
