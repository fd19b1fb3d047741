"""Attention over a ragged KV cache (heads of different lengths, packed without padding): the torch reference.

A ragged cache stores every (sequence, KV head) segment one after the other in one `[N, D]`
buffer per K and V, with each row's logical slot and each segment's length, plus a tail of
tokens appended since the last eviction that every head shares (`[B, Hkv, r, D]`). One call
attends over both exactly: one softmax over the packed rows and the tail together.

No loop runs over heads: per sequence, one matmul scores the packed rows against every query
head and a mask keeps each row to its own head's query group (a row belongs to one KV head,
so the other groups' columns are masked out; the waste is Hkv x the FLOPs of one group, in
one dense kernel call). Queries are processed in chunks, as in `kvpass.kernels.reference`.
"""

from __future__ import annotations

import torch

from kvpass.kernels.reference import QUERY_CHUNK, first_scored_query, slot_mask
from kvpass.methods.base import Stat


def segment_owners(lengths: torch.Tensor) -> torch.Tensor:
    """[N] the KV head each packed row belongs to, for `lengths` [B, Hkv] (segments in (b, h) order)."""
    heads = torch.arange(lengths.shape[1], device=lengths.device).repeat(lengths.shape[0])
    return heads.repeat_interleave(lengths.flatten().long())


def sequence_starts(lengths: torch.Tensor) -> list[int]:
    """Row where each sequence's segments start in the packed buffer, and the end: B + 1 ints."""
    rows = lengths.long().sum(1).cumsum(0)
    return [0, *rows.tolist()]


def ragged_attention(
    q: torch.Tensor,
    packed_k: torch.Tensor,
    packed_v: torch.Tensor,
    packed_slots: torch.Tensor,
    lengths: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_slots: torch.Tensor,
    q_slots: torch.Tensor,
    scale: float,
    causal: bool,
    stat: str,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of `q` [B, Hq, Lq, D] over a packed part and a tail, plus the eviction statistic.

    packed_k, packed_v [N, D], packed_slots [N] (int32), lengths [B, Hkv] (int32; segments in
    (b, h) order); tail_k, tail_v [B, Hkv, r, D], tail_slots [B, r]; q_slots [B, Lq]. Slots follow
    `kvpass.kernels.reference` (negative: padding). Returns out [B, Hq, Lq, D], the statistic of
    every packed row [N] and of every tail token [B, Hkv, r] (float32, summed over the query group).
    """
    mode = Stat(stat)
    batch, heads, length, dim = q.shape
    kv_heads, tail = lengths.shape[1], tail_k.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q)
    packed_stat = torch.zeros(packed_k.shape[0], dtype=torch.float32, device=q.device)
    tail_stat = torch.zeros(batch, kv_heads, tail, dtype=torch.float32, device=q.device)
    first = first_scored_query(mode, length, window)
    owners = segment_owners(lengths)
    starts = sequence_starts(lengths)
    query_heads = torch.arange(heads, device=q.device) // group
    for b in range(batch):
        rows = slice(starts[b], starts[b + 1])
        keys, values = packed_k[rows].float(), packed_v[rows].float()
        own = query_heads[:, None] == owners[rows][None, :]                       # [Hq, N_b]
        tail_keys, tail_values = tail_k[b].float(), tail_v[b].float()              # [Hkv, r, D]
        for start in range(0, length, QUERY_CHUNK):
            stop = min(start + QUERY_CHUNK, length)
            n = stop - start
            chunk = q[b, :, start:stop].float().contiguous()                       # [Hq, n, D]
            q_chunk_slots = q_slots[b:b + 1, start:stop]
            packed_logits = (chunk.reshape(heads * n, dim) @ keys.T).view(heads, n, -1) * scale
            visible = slot_mask(q_chunk_slots, packed_slots[rows].view(1, 1, -1), causal)[0, 0]
            packed_logits = packed_logits.masked_fill(~(own[:, None, :] & visible[None]), float("-inf"))
            tail_logits = (chunk.reshape(kv_heads, group * n, dim) @ tail_keys.transpose(1, 2)).view(heads, n, tail)
            tail_visible = slot_mask(q_chunk_slots, tail_slots[b].view(1, 1, -1), causal)[0, 0]
            tail_logits = (tail_logits * scale).masked_fill(~tail_visible, float("-inf"))
            probs = torch.softmax(torch.cat([packed_logits, tail_logits], dim=-1), dim=-1)
            packed_probs, tail_probs = probs[..., :keys.shape[0]], probs[..., keys.shape[0]:]
            result = (packed_probs.reshape(heads * n, -1) @ values).view(heads, n, dim)
            result = result + (tail_probs.reshape(kv_heads, group * n, tail) @ tail_values).view(heads, n, dim)
            out[b, :, start:stop] = result.to(q.dtype)
            if stop > first:
                scored = max(first - start, 0)
                packed_stat[rows] += packed_probs[:, scored:].sum(dim=(0, 1))
                tail_stat[b] += tail_probs[:, scored:].reshape(kv_heads, group, n - scored, tail).sum(dim=(1, 2))
    return out, packed_stat, tail_stat
