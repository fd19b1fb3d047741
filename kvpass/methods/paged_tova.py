"""Pages scored by two signals at once: ||V|| / ||K|| (PagedEviction) and the newest query's attention (TOVA).

On the varied suite the two fail in opposite modes: ||V|| / ||K|| needs no query, so it holds
when the context is compressed before the question arrives, and misses what the question asks
for once it is there; TOVA's attention is the reverse. Their scales are unrelated (a norm ratio
against a probability), so each is turned into its quantile among the layer's cached tokens
and the two quantiles are combined, with `attention_weight` setting the attention's share:
averaged (default), or interleaved (`interleave=True`: a token ranks by whichever of its two
quantiles is nearer the top, the attention's distance to the top stretched by 1 / weight and the
ratio's by 1 / (1 - weight), so at every budget about `attention_weight` of what is kept is taken
for its attention and the rest for its ratio, and a token at the top of either list is kept
however low it ranks on the other).
"""

from dataclasses import dataclass

import torch

from kvpass.methods.base import Method, Observation, Stat
from kvpass.methods.paged import value_key_ratio
from kvpass.validation import boolean, real


@dataclass
class PagedTOVA(Method):
    """16-token pages ranked by the mean of two quantiles per token: its ||V|| / ||K|| and the
    newest query's attention to it (one keep set per layer).

    Example:
        >>> import torch
        >>> from kvpass.methods.base import Observation
        >>> keys = torch.ones(1, 1, 4, 2)
        >>> values = torch.tensor([4., 3, 2, 1])[None, None, :, None].expand(1, 1, 4, 2)  # ratio ranks 3, 2, 1, 0
        >>> stat = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])                                  # attention ranks 0, 1, 2, 3
        >>> slots = torch.arange(4).expand(1, 1, 4)
        >>> scores = PagedTOVA(attention_weight=0.25).score(Observation(keys, values, slots, stat, 4, 1))
        >>> [round(score, 4) for score in scores[0, 0].tolist()]
        [0.75, 0.5833, 0.4167, 0.25]
    """

    name = "paged_tova"
    stat = Stat.LAST_QUERY
    shared_keep_set: bool = True
    page_size: int = 16
    attention_weight: float = 0.25
    """Weight of the attention quantile; the ||V|| / ||K|| quantile gets the rest. 0.25 was chosen on
    the suite's development split over 0.5 (and over ||V|| / ||K|| alone, weight 0): see the README."""
    interleave: bool = False
    """Rank by the nearer-to-top of the two weighted quantiles instead of by their weighted mean. On the
    development split (weight 0.25) it leans to query-aware use: retention 104.5 / 78.8 query-aware at
    budgets 0.5 / 0.25 against the mean's 93.6 / 70.3, and 77.6 / 40.7 context-only against 84.5 / 50.6
    (`benchmarks/results/dev_default_candidates.txt`), so it is not the default."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attention_weight = real(self.attention_weight, "PagedTOVA: attention_weight", 0.0, 1.0,
                                     meaning="weight of the attention quantile")
        self.interleave = boolean(self.interleave, "PagedTOVA: interleave")

    def score(self, obs: Observation) -> torch.Tensor:
        weight, real = self.attention_weight, obs.slots >= 0
        ratio, attention = _quantiles(value_key_ratio(obs), real), _quantiles(obs.stat.float(), real)
        if not self.interleave:
            return (1 - weight) * ratio + weight * attention
        distances = [(1 - quantile) / share for quantile, share in ((ratio, 1 - weight), (attention, weight)) if share]
        return -torch.stack(distances).amin(0)


def _quantiles(scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each real token's rank among the real cached tokens of its row and head, scaled to [0, 1].

    Padding ranks below every real token (and gets a negative quantile the selector discards):
    its keys and values differ between runtimes, so it must not move the real tokens' ranks."""
    ranks = torch.where(real, scores, float("-inf")).argsort(-1).argsort(-1)
    padding = (~real).sum(-1, keepdim=True)
    return (ranks - padding).float() / (real.sum(-1, keepdim=True) - 1).clamp_min(1)
