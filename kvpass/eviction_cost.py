"""What evicting tokens costs one attention site, along the ranking eviction uses.

Both calibration (before the first token, on calibration prompts) and decoding-time
re-allocation (on the queries that actually arrive) ask the same question: if only the
top `x` of these tokens were kept, how much would the attention of some queries change?
The answers are curves sampled at kept fractions 0, 1/GRID, ..., 1:

* `mass_kept`: the share of the queries' attention mass on the kept tokens;
* `output_errors`: the relative L2 error of the attention output, softmax renormalised
  over what is kept; the quantity the allocators minimise.
"""

from __future__ import annotations

import torch

GRID = 64
"""Curves are sampled at kept fractions 0, 1/GRID, ..., 1."""


def output_errors(scores: torch.Tensor, probs: torch.Tensor, value: torch.Tensor, context: int) -> torch.Tensor:
    """[B, Hkv, GRID+1]: relative error of the window queries' attention output when only the top
    `q/GRID` of the first `context` tokens (ranked by `scores`) are kept, averaged over the window
    and the query group. One cumulative sum over the ranked tokens gives every grid point; one KV
    head at a time bounds the memory to W x context x head_dim per query head."""
    batch, heads, window, length = probs.shape
    kv_heads = value.shape[1]
    group = heads // kv_heads
    order, counts = _ranked(scores)  # [B, Hkv, C], [GRID+1]
    curves = []
    for h in range(kv_heads):
        p = probs[:, h * group:(h + 1) * group].float()            # [B, G, W, L]
        v = value[:, h].float()                                    # [B, L, D]
        full = p @ v[:, None]                                      # [B, G, W, D]
        local_num = p[..., context:] @ v[:, None, context:]
        local_den = p[..., context:].sum(-1, keepdim=True)
        idx = order[:, h]                                          # [B, C]
        p_sorted = torch.gather(p[..., :context], -1, idx[:, None, None].expand(-1, group, window, -1))
        v_sorted = torch.gather(v[:, :context], 1, idx[..., None].expand(-1, -1, v.shape[-1]))
        num = torch.nn.functional.pad((p_sorted[..., None] * v_sorted[:, None, None]).cumsum(-2), (0, 0, 1, 0))
        den = torch.nn.functional.pad(p_sorted.cumsum(-1), (1, 0))[..., None]
        approx = (local_num[..., None, :] + num[..., counts, :]) / (local_den[..., None, :] + den[..., counts, :])
        error = (approx - full[..., None, :]).norm(dim=-1) / full.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        curves.append(error.mean(dim=(1, 2)))                      # [B, GRID+1]
    return torch.stack(curves, 1)


def mass_kept(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, GRID+1]: attention mass held by the top `q/GRID` of the tokens, ranked by `scores`."""
    order, counts = _ranked(scores)
    held = torch.nn.functional.pad(torch.gather(mass, -1, order).cumsum(-1), (1, 0))
    return held[..., counts]


def _ranked(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order, best first (ties: earlier token, as eviction breaks them), and how many of
    the ranked tokens each grid point keeps."""
    length = scores.shape[-1]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order, torch.tensor([round(q * length / GRID) for q in range(GRID + 1)], device=scores.device)
