"""Choosing which image tokens of one image stay: the arithmetic of `PrunePatches`, on plain tensors.

* `token_budget`: how many image tokens a sequence keeps, spread over its images;
* `top_scores`: the highest-scoring tokens (FastV, and VisionZip's dominant tokens);
* `representatives`: one token per group of near-duplicates (V-PRUNE-style similarity), at most a limit;
* `contextual_groups`: VisionZip's contextual tokens: the rest merged into a few by key similarity.

Each returns a `Selection`: the kept tokens (indices into the image's tokens, in order) and, when
tokens are merged, the members whose features each kept token averages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selection:
    """Kept tokens of one image (ascending indices) and, when merging, each one's members (itself included)."""

    kept: torch.Tensor
    members: list[torch.Tensor] | None = None


def token_budget(sizes: list[int], keep: float | int) -> list[int]:
    """Image tokens each image keeps: `ceil(keep * total)` for a fraction, `min(keep, total)` for a
    count, split over the images in proportion to their sizes (largest remainder).

    Example:
        >>> token_budget([576], 0.25), token_budget([64, 64, 64], 0.5), token_budget([10, 30], 20)
        ([144], [32, 32, 32], [5, 15])
    """
    total = sum(sizes)
    wanted = min(keep, total) if isinstance(keep, int) else math.ceil(keep * total - 1e-9)
    if not total:
        return [0 for _ in sizes]
    exact = [wanted * size / total for size in sizes]
    counts = [math.floor(share) for share in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:wanted - sum(counts)]:
        counts[i] += 1
    return counts


def top_scores(scores: torch.Tensor, count: int) -> Selection:
    """The `count` highest scores (ties: the earlier token).

    Example:
        >>> top_scores(torch.tensor([0.1, 0.5, 0.2, 0.5]), 2).kept.tolist()
        [1, 3]
    """
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:count]
    return Selection(torch.sort(order).values)


def representatives(vectors: torch.Tensor, limit: int, threshold: float) -> Selection:
    """At most `limit` tokens, one per group of near-duplicates (greedy k-center).

    Tokens closer than `threshold` x the vectors' RMS norm are duplicates. Starting from the token
    nearest the mean, the token farthest from every chosen one is added until all are within the
    threshold of a chosen one, or `limit` are chosen; every token joins its nearest chosen one.

    Example:
        >>> flat = torch.ones(6, 4)
        >>> representatives(flat, 3, 0.05).kept.tolist()        # one colour: one group
        [0]
        >>> representatives(torch.eye(6), 3, 0.05).kept.numel()  # all different: the limit
        3
    """
    x = vectors.float().reshape(vectors.shape[0], -1)
    tolerance = threshold * x.pow(2).sum(dim=-1).mean().sqrt()
    distance = torch.cdist(x, x)
    chosen = [int((x - x.mean(dim=0)).norm(dim=-1).argmin())]
    nearest = distance[chosen[0]].clone()
    while len(chosen) < limit and bool(nearest.max() > tolerance):
        far = int(nearest.argmax())
        chosen.append(far)
        nearest = torch.minimum(nearest, distance[far])
    centers = torch.tensor(sorted(chosen), device=vectors.device)
    owner = distance[:, centers].argmin(dim=-1)
    return Selection(centers, [torch.nonzero(owner == i).flatten() for i in range(len(centers))])


def contextual_groups(scores: torch.Tensor, keys: torch.Tensor, count: int, contextual: int) -> Selection:
    """VisionZip: the `count - contextual` highest scores stay as they are; the other tokens are merged
    into `contextual` tokens: evenly spaced targets among them, each joined by the remaining tokens
    whose keys are most similar (cosine) to its key.

    Example:
        >>> keys = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1], [1, 0], [0, 1]])
        >>> s = contextual_groups(torch.tensor([9.0, 8, 0, 0, 0, 0]), keys, 4, 2)
        >>> s.kept.tolist(), [m.tolist() for m in s.members]
        ([0, 1, 2, 5], [[0], [1], [2, 4], [5, 3]])
    """
    dominant = top_scores(scores, count - contextual).kept
    if contextual == 0:
        return Selection(dominant)
    rest = torch.tensor([i for i in range(scores.shape[0]) if i not in set(dominant.tolist())], device=scores.device)
    targets = rest[torch.linspace(0, rest.numel() - 1, contextual, device=scores.device).round().long().unique()]
    others = rest[~torch.isin(rest, targets)]
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    joins = (unit[others] @ unit[targets].T).argmax(dim=-1) if others.numel() else others
    groups = {int(i): torch.tensor([int(i)], device=scores.device) for i in dominant}
    for position, target in enumerate(targets.tolist()):
        groups[target] = torch.cat([torch.tensor([target], device=scores.device), others[joins == position]])
    kept = sorted(groups)
    return Selection(torch.tensor(kept, device=scores.device), [groups[i] for i in kept])
