"""Reference torch implementations of kvpass's kernels.

These run everywhere and are the oracle the Triton kernels are tested against. The
attention never builds the full [Hq, Lq, Lk] probability matrix at once: queries are
processed in chunks, so scoring a 32K prefill costs O(chunk x Lk) memory.

Slot convention: every cached token carries its logical position in the sequence
(`slot`). Padding tokens carry `-1 - slot`, so they stay masked, yet a padding query can
still see itself (which keeps its output finite instead of NaN).
"""

from __future__ import annotations

import torch

from kvpass.methods.base import Stat

QUERY_CHUNK = 256


def slot_mask(q_slots: torch.Tensor, k_slots: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean visibility [B, Hkv, Lq, Lk]: which cached slots each query may attend to."""
    k = k_slots[:, :, None, :]
    q = q_slots[:, None, :, None]
    visible = k >= 0
    if causal:
        visible = visible & (k <= q)
    return visible | (k == -1 - q)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_slots: torch.Tensor,
    k_slots: torch.Tensor,
    scale: float,
    causal: bool,
    stat: str,
    window: int,
    mask: torch.Tensor | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a (possibly compacted) cache, plus the eviction statistic it asks for.

    q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]; q_slots [B, Lq]; k_slots [B, Hkv, Lk].
    Returns out [B, Hq, Lq, D] and stat [B, Hkv, Lk] (float32, summed over the query group;
    zeros when `stat` is 'none').

    The model's own attention, where it is more than causal + padding: `mask` [B, 1 or Hkv or Hq, Lq, Lk]
    over the cached keys (bool: True attends; float: added to the logits) is applied on top of the
    slot mask (sliding windows, chunks, custom masks); `softcap` > 0 caps the logits at
    `softcap·tanh(x/softcap)` (Gemma 2); `sinks` [Hq] are learned logits of a virtual key that
    joins every softmax's denominator and contributes no value (GPT-OSS).
    """
    mode = Stat(stat)
    batch, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    plain_logits = mask is None and not softcap and sinks is None
    if mode is Stat.NONE and plain_logits and (lq == lk or lq == 1) and _plain(q_slots, k_slots):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal and lq > 1, scale=scale, enable_gqa=group > 1)
        return out, torch.zeros(batch, hkv, lk, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    stats = torch.zeros(batch, hkv, lk, dtype=torch.float32, device=q.device)
    first_scored = first_scored_query(mode, lq, window) if not (softcap or sinks is not None) else 0
    unscored = 0
    if causal and plain_logits and lq == lk and first_scored > 1 and _plain(q_slots, k_slots):
        # a plain causal prefill: the queries no statistic reads see only their own prefix, one fused SDPA call
        unscored = first_scored
        out[:, :, :unscored] = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, :unscored], k[:, :, :unscored], v[:, :, :unscored], is_causal=True, scale=scale,
            enable_gqa=group > 1)
    k_rep = k.repeat_interleave(group, dim=1) if group > 1 else k
    v_rep = v.repeat_interleave(group, dim=1) if group > 1 else v
    for start in range(unscored, lq, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, lq)
        visible = slot_mask(q_slots[:, start:stop], k_slots, causal)
        visible = visible.repeat_interleave(group, dim=1) if group > 1 else visible
        bias = None
        if mask is not None:
            rows = mask[:, :, start:stop]
            rows = rows.repeat_interleave(group, dim=1) if rows.shape[1] == hkv != hq else rows
            if rows.dtype == torch.bool:
                visible = visible & rows
            else:
                bias = rows.float().expand_as(visible)
        q_chunk = q[:, :, start:stop]
        if stop <= first_scored:
            attn_mask = visible if bias is None else bias.masked_fill(~visible, float("-inf")).to(q.dtype)
            out[:, :, start:stop] = torch.nn.functional.scaled_dot_product_attention(
                q_chunk, k_rep, v_rep, attn_mask=attn_mask, scale=scale
            )
            continue
        logits = (q_chunk.float() @ k_rep.float().transpose(-1, -2)) * scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        if bias is not None:
            logits = logits + bias
        logits = logits.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.float().reshape(1, hq, 1, 1).expand(batch, hq, stop - start, 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(logits, dim=-1)
        out[:, :, start:stop] = (probs @ v_rep.float()).to(q.dtype)
        scored = probs[:, :, max(first_scored - start, 0):]
        stats += scored.sum(dim=2).view(batch, hkv, group, lk).sum(dim=2)
    return out, stats


def _plain(q_slots: torch.Tensor, k_slots: torch.Tensor) -> bool:
    """Whether the slot mask is ordinary causal attention in index order, so SDPA needs no mask:
    no padding, every head holding the same tokens, the queries being the last keys, and every
    earlier key before the first query. Compacted caches qualify (their order is slot order)."""
    lq = q_slots.shape[-1]
    if lq == 0 or bool((k_slots < 0).any()) or not torch.equal(k_slots, k_slots[:, :1].expand_as(k_slots)):
        return False
    keys = k_slots[:, 0]
    own = keys[:, keys.shape[-1] - lq:]
    return (torch.equal(own, q_slots.to(own.dtype)) and bool((own[:, 1:] > own[:, :-1]).all())
            and bool((keys[:, :keys.shape[-1] - lq] < own[:, :1]).all()))


def first_scored_query(mode: Stat, lq: int, window: int) -> int:
    """Index of the first query whose attention row contributes to the statistic."""
    if mode is Stat.NONE:
        return lq
    if mode is Stat.LAST_QUERY:
        return lq - 1
    if mode is Stat.WINDOW:
        return max(lq - window, 0)
    return 0


def select_and_compact(
    k: torch.Tensor, v: torch.Tensor, k_slots: torch.Tensor, scores: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the `keep` highest-scoring tokens of every (batch, KV head), in slot order.

    Ties break towards the earlier token (a stable sort), the same rule as ONNX TopK, so
    the torch and onnxruntime paths keep the same positions. Returns new contiguous
    (k, v, slots) of length `keep` and the kept indices [B, Hkv, keep] into the old cache.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    index = torch.sort(order, dim=-1).values
    gather = index[..., None].expand(-1, -1, -1, k.shape[-1])
    return (
        torch.gather(k, 2, gather),
        torch.gather(v, 2, gather),
        torch.gather(k_slots, 2, index),
        index,
    )
