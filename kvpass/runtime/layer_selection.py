"""The arithmetic of prefill token selection: which tokens matter at a layer, and when their ranking is stable.

Pure tensor functions, independent of any model library (`kvpass.runtime.hf_selection` calls
them from inside a transformers prefill):

* `window_scores`: SnapKV's score of every token before the observation window: the attention
  the last `window` queries give it, average-pooled over neighbouring tokens, summed over heads.
* `rank_variance_ratio`: ASL's stability test. Over the layers observed, take the union of
  each layer's top-`k` tokens; the variance of each such token's rank across those layers,
  averaged, relative to the variance of their ranks at the first of those layers. A ranking
  that no longer changes gives 0; ranks reshuffled at random give about 1.
* `selected_tokens`: the top-`k` tokens by score, in sequence order, plus the window.
"""

from __future__ import annotations

import torch


def window_scores(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scale: float, window: int,
                  kernel: int) -> torch.Tensor:
    """float32 [B, T - window]: how much the last `window` queries attend to each earlier token.

    `query` [B, Hq, T, D] and `keys` [B, Hkv, T, D] of one prefill (grouped heads share a key
    head); `mask` the model's 4-D attention mask (bool, or float added to the logits) or None
    for plain causal attention.

    Example:
        >>> q, k = torch.randn(1, 2, 10, 4), torch.randn(1, 1, 10, 4)
        >>> window_scores(q, k, None, 0.5, window=3, kernel=3).shape
        torch.Size([1, 7])
    """
    batch, heads, length, _ = query.shape
    keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
    logits = query[:, :, -window:].float() @ keys.float().transpose(-1, -2) * scale
    rows = torch.arange(length - window, length, device=query.device)
    visible = torch.arange(length, device=query.device)[None, :] <= rows[:, None]
    if mask is not None:
        rows_mask = mask[:, :, -window:, -length:]
        visible = visible & (rows_mask if rows_mask.dtype == torch.bool else rows_mask == 0)
    probabilities = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    attention = probabilities.sum(dim=2)[..., : length - window]
    pooled = torch.nn.functional.avg_pool1d(attention, kernel, stride=1, padding=kernel // 2)
    return pooled.sum(dim=1)


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """float32 ranks (0: highest score) along the last dimension; ties go to the earlier token."""
    order = torch.argsort(-scores, dim=-1, stable=True)
    return torch.argsort(order, dim=-1, stable=True).float()


def rank_variance_ratio(history: list[torch.Tensor], k: int) -> torch.Tensor:
    """float32 [B]: ASL's relative rank variance over the observed layers' scores (oldest first).

    With one layer observed there is no variance yet: the ratio is 1, the reference itself.

    Example:
        >>> stable = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
        >>> rank_variance_ratio([stable, stable * 2], k=2)
        tensor([0.])
        >>> rank_variance_ratio([stable, stable.flip(-1)], k=2)
        tensor([1.])
    """
    if len(history) == 1:
        return torch.ones(history[0].shape[0])
    observed = ranks(torch.stack(history))  # [layers, B, T]
    union = (observed < k).any(dim=0).float()
    count = union.sum(dim=-1)
    across = observed.var(dim=0, unbiased=False)
    spread = (across * union).sum(dim=-1) / count
    first = observed[0]
    mean = (first * union).sum(dim=-1, keepdim=True) / count[:, None]
    reference = (((first - mean) ** 2) * union).sum(dim=-1) / count
    return torch.where(reference > 0, spread / reference.clamp_min(1e-12), torch.zeros_like(spread))


def selected_tokens(scores: torch.Tensor, length: int, keep: int) -> torch.Tensor:
    """int64 [B, keep]: the `keep - window` best-scored tokens in sequence order, then the
    window (the last `length - scores.shape[-1]` tokens).

    Example:
        >>> selected_tokens(torch.tensor([[0.1, 0.9, 0.5, 0.2]]), length=6, keep=4)
        tensor([[1, 2, 4, 5]])
    """
    before = scores.shape[-1]
    best = scores.topk(keep - (length - before), dim=-1, sorted=False).indices.sort(dim=-1).values
    window = torch.arange(before, length, device=scores.device).expand(scores.shape[0], -1)
    return torch.cat([best, window], dim=-1)
