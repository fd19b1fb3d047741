"""The ragged compacted cache of one attention site: each KV head holds its own number of tokens.

Per-head budgets (AdaKV) and streaming heads (DuoAttention) make a layer's heads keep different
numbers of tokens. kvpass stores them for real, never padded and never masked:

* the **packed** part: every (sequence, KV head) segment one after the other, K and V as one
  `[N, D]` buffer each, an int32 logical slot and the method's statistic per row, and one int32
  length per segment (`lengths [B, Hkv]`);
* the **tail**: tokens appended since the last eviction, the same for every head
  (`[B, Hkv, r, D]`, one slot per token), merged into the packed part at the next eviction.

Attention covers both exactly (`torch.ops.kvpass.ragged_attention`: one softmax over packed rows
and tail). An eviction builds a transient padded view of every head's tokens, scores it with the
method (so every method's `score`, span and page pooling work unchanged), chooses per head
(`kvpass.planning.HeadSchedule`: streaming heads keep their window, the others an equal share or
a joint top-k over the layer with a per-head floor) and gathers the kept rows into new packed
buffers; the old ones and the view are released.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from kvpass.errors import UnsupportedModelError
from kvpass.kernels.ragged import sequence_starts
from kvpass.methods import Method, Observation, Stat, get_method
from kvpass.methods.selection import ranking_scores
from kvpass.planning import SiteSchedule
from kvpass.planning.head_schedule import HeadSchedule
from kvpass.runtime.compacted_cache import CompactedKV, TokenPositions
from kvpass.runtime.ragged_keep import keep_rule

if TYPE_CHECKING:
    from kvpass.runtime.reallocation import Reallocator

RECENCY = get_method("streaming_llm")
"""How a plan without an eviction method ranks the tokens of budgeted heads (only when a padded
batch leaves them short of room): newest first."""


class RaggedKV:
    """One site's ragged cache. Call `extend` with the new K/V, then `attend` with the queries.

    Example:
        >>> plan = kvpass.plan(model, 0.25, transforms=[kvpass.Evict("tova", per_head=True)])   # doctest: +SKIP
        >>> cache = RaggedKV(plan.head_schedule(site, 4), plan.method, site.group_size)          # doctest: +SKIP
    """

    def __init__(self, heads: HeadSchedule, method: Method | None, group_size: int):
        self.heads = heads
        self.method = method
        self.group_size = group_size
        self.packed_keys: torch.Tensor | None = None
        """[N, D] every (sequence, KV head) segment's keys, one after the other (None before the first eviction)."""
        self.packed_values: torch.Tensor | None = None
        self.packed_slots: torch.Tensor | None = None
        """int32 [N] logical position of every packed row."""
        self.packed_stat: torch.Tensor | None = None
        """float32 [N] the method's running statistic per packed row."""
        self.lengths: torch.Tensor | None = None
        """int32 [B, Hkv] rows each segment holds."""
        self.tail_keys: torch.Tensor | None = None
        """[B, Hkv, r, D] tokens appended since the last eviction."""
        self.tail_values: torch.Tensor | None = None
        self.tail_slots: torch.Tensor | None = None
        """int32 [B, r] their slots, or None while they are simply seen - r .. seen - 1."""
        self.tail_stat: torch.Tensor | None = None
        self.seen = 0
        self.pending = 0
        self.evictions = 0

    @classmethod
    def from_prefill(cls, heads: HeadSchedule, method: Method | None, group_size: int, keys: torch.Tensor,
                     values: torch.Tensor, stat: torch.Tensor | None) -> RaggedKV:
        """A cache for an already computed prefill (contiguous slots), evicted as `attend` would have."""
        cache = cls(heads, method, group_size)
        cache.adopt(keys, values, keys.shape[-2])
        cache.tail_stat = stat if cache.stat_mode is not Stat.NONE else None
        if cache._due():
            cache._evict()
        return cache

    @property
    def stat_mode(self) -> Stat:
        return self.method.stat if self.method is not None and self.heads.base.prunes else Stat.NONE

    @property
    def batch_size(self) -> int:
        source = self.tail_keys if self.tail_keys is not None else self.lengths
        return 0 if source is None else source.shape[0]

    @property
    def tail_length(self) -> int:
        return 0 if self.tail_keys is None else self.tail_keys.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds, for byte accounting."""
        held = (self.packed_keys, self.packed_values, self.packed_slots, self.packed_stat, self.lengths,
                self.tail_keys, self.tail_values, self.tail_slots, self.tail_stat)
        return [t for t in held if t is not None]

    def head_lengths(self) -> torch.Tensor:
        """[B, Hkv] tokens each KV head holds (padding of the tail included)."""
        if self.lengths is None:
            return torch.full(self.tail_keys.shape[:2], self.tail_length, device=self.tail_keys.device)
        return self.lengths.long() + self.tail_length

    def head_slots(self) -> list[list[torch.Tensor]]:
        """[B][Hkv] the slots each (sequence, KV head) holds, in cache order: packed rows, then the tail."""
        batch, heads = self.batch_size, self.heads.kv_heads
        device = (self.tail_keys if self.tail_keys is not None else self.lengths).device
        tail = self._tail_slots(batch, self.seen, device) if self.tail_keys is not None else \
            torch.zeros(batch, 0, dtype=torch.int32, device=device)
        if self.lengths is None:
            return [[tail[row] for _ in range(heads)] for row in range(batch)]
        segments = self.packed_slots.split(self.lengths.flatten().tolist())
        return [[torch.cat([segments[row * heads + head], tail[row]]) for head in range(heads)] for row in range(batch)]

    def empty(self) -> RaggedKV:
        """A new, empty cache like this one."""
        return RaggedKV(self.heads, self.method, self.group_size)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Take over a filled uniform cache [B, Hkv, T, D] of all `seen` tokens (contiguous slots) as this
        cache's tail."""
        if seen != keys.shape[-2]:
            raise UnsupportedModelError(f"a ragged cache cannot take over a cache holding {keys.shape[-2]} of {seen} "
                                        "tokens (a sliding window): it needs every token from the first")
        self.tail_keys, self.tail_values, self.seen = keys, values, seen

    def extend(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new K/V [B, Hkv, L, D] to the tail; returns the tail including them."""
        if self.pending:
            raise RuntimeError("RaggedKV.extend called twice without attend in between")
        if self.tail_keys is None:
            self.tail_keys, self.tail_values = k_new, v_new
        else:
            self.tail_keys = torch.cat([self.tail_keys, k_new], dim=-2)
            self.tail_values = torch.cat([self.tail_values, v_new], dim=-2)
        self.pending = k_new.shape[-2]
        return self.tail_keys, self.tail_values

    def attend(
        self, q: torch.Tensor, scale: float, causal: bool = True, key_padding: torch.Tensor | None = None,
        model_mask: torch.Tensor | None = None, softcap: float = 0.0, sinks: torch.Tensor | None = None,
        positions: TokenPositions | None = None,
    ) -> torch.Tensor:
        """Attention of `q` [B, Hq, L, D] over the packed part and the tail, then eviction when due.

        `key_padding` [B, seen + L] marks which tokens of the sequence so far are padding (the
        model's mask); only the appended ones are read, older ones carry their flag in their slot.
        A model's own mask, soft-capping and sink logits and tokens pruned before the attention
        (`CompactedKV.attend`) are refused by name."""
        if model_mask is not None or softcap or sinks is not None:
            raise UnsupportedModelError("a ragged cache applies causal + padding masks only: it cannot apply the "
                                        "model's own mask, logit soft-capping or sink logits")
        if positions is not None:
            raise UnsupportedModelError("a ragged cache (per-head budgets, streaming heads) cannot take tokens pruned "
                                        "before the attention (PrunePatches): combine PrunePatches with Evict alone")
        batch, start, new = q.shape[0], self.seen, self.pending
        q_slots = torch.arange(start, start + new, device=q.device, dtype=torch.int32).expand(batch, new)
        if key_padding is not None:
            key_padding = key_padding[:, key_padding.shape[-1] - new:]
        if key_padding is not None and (self.tail_slots is not None or bool(key_padding.any())):
            self.tail_slots = self._tail_slots(batch, start, q.device)
            self.tail_slots = torch.cat([self.tail_slots, torch.where(key_padding, -1 - q_slots, q_slots)], dim=-1)
        elif self.tail_slots is not None:
            self.tail_slots = torch.cat([self.tail_slots, q_slots], dim=-1)
        tail_slots = self._tail_slots(batch, start + new, q.device)
        packed = self._packed_or_empty(batch, q)
        out, packed_stat, tail_stat = torch.ops.kvpass.ragged_attention(
            q, *packed, self.tail_keys, self.tail_values, tail_slots, q_slots.contiguous(), scale, causal,
            self.stat_mode.value, self.method.window if self.method is not None else 0,
        )
        self.seen += new
        self.pending = 0
        if self.stat_mode is not Stat.NONE:
            self._accumulate(packed_stat, tail_stat, new)
        if self._due():
            self._evict()
        return out

    def _tail_slots(self, batch: int, end: int, device: torch.device) -> torch.Tensor:
        """The tail's slots up to `end` (exclusive): stored, or the tail's contiguous positions."""
        if self.tail_slots is not None:
            return self.tail_slots
        length = self.tail_length - (self.seen + self.pending - end)
        return torch.arange(end - length, end, device=device, dtype=torch.int32).expand(batch, length).contiguous()

    def _packed_or_empty(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(keys, values, slots, lengths) of the packed part; empty tensors before the first eviction."""
        if self.packed_keys is not None:
            return self.packed_keys, self.packed_values, self.packed_slots, self.lengths
        dim = self.tail_keys.shape[-1]
        empty = self.tail_keys.new_empty(0, dim)
        return (empty, self.tail_values.new_empty(0, self.tail_values.shape[-1]),
                torch.empty(0, dtype=torch.int32, device=like.device),
                torch.zeros(batch, self.heads.kv_heads, dtype=torch.int32, device=like.device))

    def _accumulate(self, packed_stat: torch.Tensor, tail_stat: torch.Tensor, new: int) -> None:
        mode = self.stat_mode
        if self.packed_stat is not None:
            self.packed_stat = mode.combine(self.packed_stat, packed_stat)
        if self.tail_stat is None or mode is Stat.LAST_QUERY:
            self.tail_stat = tail_stat
        else:
            self.tail_stat = mode.combine(torch.nn.functional.pad(self.tail_stat, (0, new)), tail_stat)

    # ----------------------------------------------------------------- when and what to evict

    def _real_counts(self) -> list[list[int]]:
        """[B][Hkv] real tokens each (sequence, head) holds: packed rows and the tail's non-padding."""
        real = self.lengths.long() if self.lengths is not None else 0
        tail_real = (self._tail_slots(self.batch_size, self.seen, self.tail_keys.device) >= 0).sum(-1, keepdim=True)
        return (real + tail_real).expand(self.batch_size, self.heads.kv_heads).tolist()

    def _due(self) -> bool:
        """`HeadSchedule.due` of this cache (the ONNX host asks the same of its own state)."""
        if self.tail_keys is None or self.tail_length == 0:
            return False
        packed = int(self.lengths.sum(1).max()) if self.lengths is not None else None
        return self.heads.due(self.seen, self.tail_length, packed, self.heads.wanted(self._real_counts()))

    def _evict(self) -> None:
        view = self._padded_view()
        keep = self._keep(*view)
        index = keep.flatten().nonzero().squeeze(1)
        keys, values, slots, stat = view
        self.packed_keys = keys.flatten(0, 2).index_select(0, index)
        self.packed_values = values.flatten(0, 2).index_select(0, index)
        self.packed_slots = slots.flatten().index_select(0, index)
        self.packed_stat = stat.flatten().index_select(0, index) if stat is not None else None
        self.lengths = keep.sum(-1, dtype=torch.int32)
        self.tail_keys = self.tail_values = self.tail_slots = self.tail_stat = None
        self.evictions += 1

    def _padded_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every head's tokens (packed, then tail) as [B, Hkv, T, ...] for scoring, padded at the end of
        short heads with slot -1: (keys, values, slots, stat)."""
        batch, kv_heads, tail = self.batch_size, self.heads.kv_heads, self.tail_length
        device = self.tail_keys.device
        packed = self.lengths.long() if self.lengths is not None else torch.zeros(batch, kv_heads, dtype=torch.long,
                                                                                   device=device)
        width = int((packed + tail).max())
        segments = torch.arange(batch * kv_heads, device=device)
        tail_index = (segments[:, None] * width + packed.flatten()[:, None]
                      + torch.arange(tail, device=device)[None, :]).flatten()
        tail_slots = self._tail_slots(batch, self.seen, device)[:, None, :].expand(batch, kv_heads, tail).flatten()
        sources = [(tail_index, self.tail_keys.flatten(0, 2), self.tail_values.flatten(0, 2), tail_slots,
                    self.tail_stat.flatten() if self.tail_stat is not None else None)]
        if self.lengths is not None:
            owner = segments.repeat_interleave(packed.flatten())
            first_row = torch.nn.functional.pad(packed.flatten().cumsum(0), (1, 0))[:-1]
            position = torch.arange(owner.shape[0], device=device) - first_row[owner]
            sources.append((owner * width + position, self.packed_keys, self.packed_values, self.packed_slots,
                            self.packed_stat))
        size = batch * kv_heads * width
        keys = self.tail_keys.new_zeros(size, self.tail_keys.shape[-1])
        values = self.tail_values.new_zeros(size, self.tail_values.shape[-1])
        slots = torch.full((size,), -1, dtype=torch.int32, device=device)
        stat = torch.zeros(size, dtype=torch.float32, device=device) if self.stat_mode is not Stat.NONE else None
        for index, k, v, s, st in sources:
            keys[index], values[index], slots[index] = k, v, s
            if stat is not None and st is not None:
                stat[index] = st
        shape = (batch, kv_heads, width)
        slots = slots.view(shape)
        return keys.view(*shape, -1), values.view(*shape, -1), slots, None if stat is None else stat.view(shape)

    def _keep(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
              stat: torch.Tensor | None) -> torch.Tensor:
        """[B, Hkv, T] the tokens the eviction at `seen` keeps (`kvpass.runtime.ragged_keep.RaggedKeep`).

        The joint top-k compares the heads' own scores (a head whose tokens score high gets more of
        them); each head then keeps its carve-outs, its floor and that many more tokens in the order
        its method ranks them, so a method with a shared keep set still keeps a prefix of the
        layer-wide ranking in every head (its robustness stays; only the depth differs per head)."""
        heads, seen = self.heads, self.seen
        rows, window, carve = heads.eviction_sizes(seen)
        rule = keep_rule(heads)
        counts = rule.streaming_keep(slots, seen, *window).sum(dim=(1, 2)).tolist()
        splits = torch.tensor(heads.split_table(rows, counts), device=slots.device)
        budgeted = torch.tensor(rule.budgeted, device=slots.device, dtype=torch.long)
        pick = lambda x: x.index_select(1, budgeted) if x is not None else None  # noqa: E731
        method = self.method or RECENCY
        observation = Observation(pick(keys), pick(values), pick(slots), pick(stat), seen, self.group_size)
        scores = ranking_scores(method, observation, *carve)
        own = ranking_scores(replace(method, shared_keep_set=False), observation, *carve) \
            if heads.joint and method.shared_keep_set else scores
        return rule(scores, own, slots, seen, *window, splits)

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (or reorder, or repeat) batch rows, as beam search and batch filtering need."""
        if self.lengths is not None:
            starts = torch.tensor(sequence_starts(self.lengths), device=self.lengths.device)
            index = index.to(self.lengths.device)
            counts = (starts[1:] - starts[:-1])[index]
            first_new = torch.nn.functional.pad(counts.cumsum(0), (1, 0))[:-1]
            rows = (starts[:-1][index] - first_new).repeat_interleave(counts) + torch.arange(
                int(counts.sum()), device=counts.device)
            for name in ("packed_keys", "packed_values", "packed_slots", "packed_stat"):
                tensor = getattr(self, name)
                if tensor is not None:
                    setattr(self, name, tensor.index_select(0, rows))
            self.lengths = self.lengths.index_select(0, index)
        for name in ("tail_keys", "tail_values", "tail_slots", "tail_stat"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))


def new_site_cache(schedule: SiteSchedule, heads: HeadSchedule | None, method: Method | None, group_size: int,
                   reallocator: Reallocator | None = None, index: int = 0) -> CompactedKV | RaggedKV:
    """An empty cache for one site: ragged when its heads keep different numbers of tokens, else uniform."""
    if heads is None:
        return CompactedKV(schedule, method, group_size, reallocator, index)
    if reallocator is not None:
        raise UnsupportedModelError("re-allocating budget while decoding (reallocate=N) is not supported with "
                                    "per-head budgets or streaming heads; plan with reallocate=0")
    return RaggedKV(heads, method, group_size)


def site_cache_from_prefill(schedule: SiteSchedule, heads: HeadSchedule | None, method: Method | None,
                            group_size: int, keys: torch.Tensor, values: torch.Tensor, stat: torch.Tensor | None,
                            reallocator: Reallocator | None = None, index: int = 0) -> CompactedKV | RaggedKV:
    """A site's cache for an already computed prefill, evicted as the first `attend` would have."""
    if heads is None:
        return CompactedKV.from_prefill(schedule, method, group_size, keys, values, stat, reallocator, index)
    new_site_cache(schedule, heads, method, group_size, reallocator, index)  # refuses what a ragged cache cannot do
    return RaggedKV.from_prefill(heads, method, group_size, keys, values, stat)
