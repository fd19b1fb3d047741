"""Triton attention over a ragged KV cache: the packed part and the tail, merged by log-sum-exp.

The packed part runs the decode (or prefill) kernel reading each head's segment through its
offset; the tail runs the same kernels over its [B, Hkv, r, D] tensors. The two normalised
outputs merge exactly by their base-2 log-sum-exps, and the statistics kernel re-derives each
key's probabilities from the merged LSE, so every number matches `kvpass.kernels.ragged`.
"""

from __future__ import annotations

import torch

from kvpass.kernels.triton_attention import attention_stats, attention_with_lse


def ragged_attention(
    q: torch.Tensor, packed_k: torch.Tensor, packed_v: torch.Tensor, packed_slots: torch.Tensor,
    lengths: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor, tail_slots: torch.Tensor,
    q_slots: torch.Tensor, scale: float, causal: bool, stat: str, window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of `kvpass.kernels.ragged.ragged_attention` (same arguments and results)."""
    batch, kv_heads, tail = tail_k.shape[0], lengths.shape[1], tail_k.shape[2]
    offsets = (lengths.flatten().long().cumsum(0) - lengths.flatten().long()).view_as(lengths)
    tail_k_slots = tail_slots[:, None, :].expand(batch, kv_heads, tail).contiguous()
    parts = []
    if packed_k.shape[0]:
        parts.append(attention_with_lse(q, packed_k, packed_v, q_slots, packed_slots, scale, causal, lengths, offsets))
    if tail:
        parts.append(attention_with_lse(q, tail_k, tail_v, q_slots, tail_k_slots, scale, causal))
    out, lse = parts[0]
    if len(parts) == 2:
        (out_p, lse_p), (out_t, lse_t) = parts
        top = torch.maximum(lse_p, lse_t)
        w_p, w_t = torch.exp2(lse_p - top), torch.exp2(lse_t - top)
        out = ((out_p.float() * w_p[..., None] + out_t.float() * w_t[..., None]) / (w_p + w_t)[..., None]).to(q.dtype)
        lse = top + torch.log2(w_p + w_t)
    packed_stat = attention_stats(q, packed_k, q_slots, packed_slots, lse, scale, causal, stat, window, lengths,
                                  offsets) if packed_k.shape[0] else packed_slots.new_zeros(0, dtype=torch.float32)
    tail_stat = attention_stats(q, tail_k, q_slots, tail_k_slots, lse, scale, causal, stat, window)
    return out, packed_stat, tail_stat
