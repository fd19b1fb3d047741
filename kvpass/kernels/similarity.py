"""Key–value similarity: the redundancy score behind token filtering (seed token-filtering-kv-similarity).

A token whose key and value both point where the head's average token points adds little
the others do not already carry, so it is the first to drop. Key and value similarity are
mixed per head with variance-aware weights: whichever of the two actually varies across a
head's tokens separates them, so it gets the larger weight; a flat signal gets little.

Exact formula, per batch b and KV head h, over the valid tokens V = {t : slot_t >= 0}:

    k̄ = mean_{t in V} k_t                      v̄ = mean_{t in V} v_t          (float32)
    s^K_t = <k_t, k̄> / max(|k_t| |k̄|, EPS)      s^V_t = <v_t, v̄> / max(|v_t| |v̄|, EPS)
    σ²_K = Var_{t in V}(s^K_t)                   σ²_V = Var_{t in V}(s^V_t)     (population)
    a = (σ²_K + EPS) / (σ²_K + σ²_V + 2 EPS)
    redundancy_t = a s^K_t + (1 - a) s^V_t  in [-1, 1];   padding tokens (slot < 0) get +inf.

Higher means more redundant; a keep-set method scores tokens by `-redundancy`.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def kv_similarity(k: torch.Tensor, v: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
    """Redundancy [B, Hkv, T] (float32) of every cached token; k, v [B, Hkv, T, D], k_slots [B, Hkv, T]."""
    if k.shape[:3] != v.shape[:3] or tuple(k_slots.shape) != tuple(k.shape[:3]):
        raise ValueError(
            f"k {tuple(k.shape)}, v {tuple(v.shape)} and k_slots {tuple(k_slots.shape)} must share [B, Hkv, T]"
        )
    valid = (k_slots >= 0).float()
    count = valid.sum(-1, keepdim=True).clamp_min(1.0)
    sim_k = _cosine_to_mean(k.float(), valid, count)
    sim_v = _cosine_to_mean(v.float(), valid, count)
    var_k = _masked_variance(sim_k, valid, count)
    var_v = _masked_variance(sim_v, valid, count)
    weight = (var_k + EPS) / (var_k + var_v + 2 * EPS)
    redundancy = weight * sim_k + (1 - weight) * sim_v
    return redundancy.masked_fill(valid == 0, float("inf"))


def _cosine_to_mean(x: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Cosine of each token's vector to the mean of the valid tokens' vectors, [B, H, T]."""
    mean = (x * valid[..., None]).sum(2, keepdim=True) / count[..., None]
    norms = x.norm(dim=-1) * mean.norm(dim=-1)
    return (x * mean).sum(-1) / norms.clamp_min(EPS)


def _masked_variance(s: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Population variance over the valid tokens, [B, H, 1]."""
    mean = (s * valid).sum(-1, keepdim=True) / count
    return ((s - mean) ** 2 * valid).sum(-1, keepdim=True) / count
