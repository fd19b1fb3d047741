"""TOVA over units: a kept token keeps the rest of its unit (the digits of a number, a name).

SmolLM2's tokenizer writes one digit per token, so a number is a run of 5-8 tokens and the
newest query's attention usually peaks on one or two of them; a fixed +-2 span then drops
the last digits. The method finds units in the cache itself: adjacent tokens of one unit
carry alike values (for digits, cosine ~0.6-0.9 in most SmolLM2 layers against ~0.2 for
other neighbours), so a link joins token i to token i-1 when their values' cosine, averaged
over KV heads, stands `z` standard deviations above the layer's mean for adjacent pairs.
A token's score is then the best TOVA score within its unit, spread at most `reach` links
away, so units are kept or evicted whole. Pure tensor ops (no data-dependent branch), so
the same function exports to ONNX.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvpass.methods.base import Method, Observation, Stat


@dataclass
class UnitTOVA(Method):
    """TOVA (newest query's attention, one keep set per layer) with scores shared within units.

    Example:
        >>> import torch
        >>> from kvpass.methods.base import Observation
        >>> values = torch.tensor([[1., 0], [0, 1], [0, 1], [0, 1], [1, 0], [1, -1]]).expand(1, 2, 6, 2)
        >>> stat = torch.tensor([0, 0.9, 0, 0, 0, 0.1]).expand(1, 2, 6)
        >>> slots = torch.arange(6).expand(1, 2, 6)
        >>> UnitTOVA(z=0.5).score(Observation(values, values, slots, stat, 6, 1))[0, 0].tolist()
        [0.0, 0.8999999761581421, 0.8999999761581421, 0.8999999761581421, 0.0, 0.10000000149011612]
    """

    name = "tova_units"
    stat = Stat.LAST_QUERY
    shared_keep_set: bool = True
    span: int = 1
    z: float = 1.0
    """Link threshold: this many standard deviations above the layer's mean adjacent-value cosine."""
    reach: int = 8
    """A unit shares its best score with tokens at most this many links away."""

    def score(self, obs: Observation) -> torch.Tensor:
        scores = obs.stat.float().mean(dim=1, keepdim=True)
        linked = unit_links(obs.values, obs.slots, self.z)
        return spread_along_links(scores, linked, self.reach).expand_as(obs.stat)


def unit_links(values: torch.Tensor, slots: torch.Tensor, z: float) -> torch.Tensor:
    """[B, 1, T] bool: token i continues token i-1's unit (adjacent slots, alike values).

    `values` [B, Hkv, T, D]; `slots` [B, Hkv, T] (negative for padding; the first head's are used,
    as one keep set per layer keeps the heads' slots equal).
    """
    unit = F.normalize(values.float(), dim=-1)
    cosine = (unit[..., 1:, :] * unit[..., :-1, :]).sum(-1).mean(dim=1, keepdim=True)
    first = slots[:, :1]
    adjacent = (first[..., 1:] == first[..., :-1] + 1) & (first[..., :-1] >= 0)
    weight = adjacent.float()
    count = weight.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (cosine * weight).sum(-1, keepdim=True) / count
    std = (((cosine - mean) ** 2 * weight).sum(-1, keepdim=True) / count).sqrt()
    linked = adjacent & (cosine > mean + z * std)
    return F.pad(linked, (1, 0), value=False)


def spread_along_links(scores: torch.Tensor, linked: torch.Tensor, reach: int) -> torch.Tensor:
    """Each token takes the best score of the tokens it is linked to within `reach` steps.

    `scores` [B, 1, T]; `linked` [B, 1, T] with linked[i] joining tokens i-1 and i.
    """
    floor = torch.finfo(scores.dtype).min
    from_next = F.pad(linked[..., 1:], (0, 1), value=False)
    for _ in range(reach):
        left = F.pad(scores[..., :-1], (1, 0), value=floor)
        right = F.pad(scores[..., 1:], (0, 1), value=floor)
        scores = torch.maximum(scores, torch.maximum(torch.where(linked, left, floor),
                                                     torch.where(from_next, right, floor)))
    return scores
