"""The compacted KV cache of one attention site: physically smaller tensors, logical slots.

This is the pruned-KV contract of DESIGN.md in one class, independent of any model
library: new K/V are appended, attention runs over what is kept, and whenever the bytes
held exceed the site's cap the lowest-ranked tokens are gathered away into new, smaller
tensors (the old ones are released; nothing is masked to pretend).

Each kept token remembers its logical slot (position in the sequence), so causality for
appended tokens and padding stay right after eviction. Slots are only stored once they
stop being `0..T-1` (after the first eviction, or when padding is present), so an
unpruned cache costs exactly the bytes of its K and V.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from kvpass.kernels import ops
from kvpass.methods import Method, Observation, Stat
from kvpass.methods.selection import ranking_scores
from kvpass.planning import SiteSchedule
from kvpass.runtime.reallocation import measure

if TYPE_CHECKING:
    from kvpass.runtime.reallocation import Reallocator


class CompactedKV:
    """One site's cache. Call `extend` with the new K/V, then `attend` with the queries."""

    def __init__(self, schedule: SiteSchedule, method: Method, group_size: int,
                 reallocator: "Reallocator | None" = None, index: int = 0):
        self.schedule = schedule
        self.method = method
        self.group_size = group_size
        self.reallocator, self.index = reallocator, index
        """Shared with the model's other site caches when the plan re-allocates while decoding;
        `index` is this site's place in it."""
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        """int32 [B, Hkv, T] logical positions, or None while they are simply 0..T-1."""
        self.stat: torch.Tensor | None = None
        """float32 [B, Hkv, T] running attention statistic, for methods that use one."""
        self.seen = 0
        self.pending = 0
        self.evictions = 0

    @classmethod
    def from_prefill(
        cls, schedule: SiteSchedule, method: Method, group_size: int,
        keys: torch.Tensor, values: torch.Tensor, stat: torch.Tensor | None,
        reallocator: "Reallocator | None" = None, index: int = 0,
    ) -> "CompactedKV":
        """A cache for an already computed prefill (contiguous slots), evicted to its cap.

        Lets one prefill be shared by many (method, budget) evaluations: `stat` must be
        the prefill's statistic of `method.stat` kind.
        """
        cache = cls(schedule, method, group_size, reallocator, index)
        cache.keys, cache.values, cache.seen = keys, values, keys.shape[-2]
        cache.stat = stat if cache.stat_mode is not Stat.NONE else None
        if cache.seen > schedule.cap(cache.seen):
            batch, hkv = keys.shape[:2]
            cache._evict(cache._past_slots(batch, hkv, cache.seen, keys.device))
        return cache

    @property
    def stat_mode(self) -> Stat:
        return self.method.stat if self.schedule.prunes else Stat.NONE

    @property
    def batch_size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    def head_lengths(self) -> torch.Tensor:
        """[B, Hkv] tokens each KV head holds (all alike)."""
        return torch.full(self.keys.shape[:2], self.keys.shape[-2], dtype=torch.long, device=self.keys.device)

    def empty(self) -> "CompactedKV":
        """A new, empty cache like this one."""
        return CompactedKV(self.schedule, self.method, self.group_size, self.reallocator, self.index)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take over a filled uniform cache [B, Hkv, T, D] (contiguous slots)."""
        self.keys, self.values, self.seen = keys, values, keys.shape[-2]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds, for byte accounting."""
        return [t for t in (self.keys, self.values, self.slots, self.stat) if t is not None]

    def extend(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new K/V [B, Hkv, L, D]; returns the whole cache including them."""
        if self.pending:
            raise RuntimeError("CompactedKV.extend called twice without attend in between")
        if self.keys is None:
            self.keys, self.values = k_new, v_new
        else:
            self.keys = torch.cat([self.keys, k_new], dim=-2)
            self.values = torch.cat([self.values, v_new], dim=-2)
        self.pending = k_new.shape[-2]
        return self.keys, self.values

    def attend(
        self, q: torch.Tensor, scale: float, causal: bool = True, key_padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of `q` [B, Hq, L, D] over the cache, then eviction if over the cap.

        `key_padding` [B, L] marks which of the just-appended tokens are padding.
        """
        batch, hkv, total, _ = self.keys.shape
        start, new = self.seen, self.pending
        if self.reallocator is not None:
            self.schedule = replace(self.schedule, fraction=self.reallocator.fraction(self.index, start + new))
        q_slots = torch.arange(start, start + new, device=q.device, dtype=torch.int32).expand(batch, new)
        new_slots = q_slots[:, None, :].expand(batch, hkv, new)
        if key_padding is not None and (self.slots is not None or bool(key_padding.any())):
            # Once slots are stored no data-dependent branch is taken, so a decode step exports.
            new_slots = torch.where(key_padding[:, None, :], -1 - new_slots, new_slots)
            self.slots = self._past_slots(batch, hkv, total - new, q.device)
        if self.slots is not None:
            self.slots = torch.cat([self.slots, new_slots.contiguous()], dim=-1)
        k_slots = self.slots if self.slots is not None else self._past_slots(batch, hkv, total, q.device)
        out, stat = ops.attention(
            q, self.keys, self.values, q_slots.contiguous(), k_slots, scale, causal,
            self.stat_mode.value, self.method.window if self.method is not None else 0,
        )
        self.seen += new
        self.pending = 0
        if self.stat_mode is not Stat.NONE:
            self._accumulate(stat, new)
        if self.reallocator is not None and self.reallocator.due(self.seen, new):
            self.reallocator.observe(self.index, measure(self, q, k_slots, scale, self._ranking(k_slots)), self.seen)
        if total > self.schedule.cap(self.seen):
            self._evict(k_slots)
        return out

    def _past_slots(self, batch: int, hkv: int, length: int, device: torch.device) -> torch.Tensor:
        """The stored slots, or 0..length-1 when none were stored yet."""
        if self.slots is not None:
            return self.slots
        return torch.arange(length, device=device, dtype=torch.int32).expand(batch, hkv, length).contiguous()

    def _accumulate(self, stat: torch.Tensor, new: int) -> None:
        if self.stat is None or self.stat_mode is Stat.LAST_QUERY:
            self.stat = stat
            return
        grown = torch.nn.functional.pad(self.stat, (0, new))
        self.stat = self.stat_mode.combine(grown, stat)

    def _ranking(self, k_slots: torch.Tensor) -> torch.Tensor:
        """Every cached token's score as the next eviction will rank it."""
        sinks, recent = self.schedule.carve_out(self.schedule.kept(self.seen))
        obs = Observation(self.keys, self.values, k_slots, self.stat, self.seen, self.group_size)
        return ranking_scores(self.method, obs, sinks, recent)

    def _evict(self, k_slots: torch.Tensor) -> None:
        keep = self.schedule.kept(self.seen)
        scores = self._ranking(k_slots)
        self.keys, self.values, self.slots, index = ops.select_and_compact(
            self.keys, self.values, k_slots, scores, keep
        )
        if self.stat is not None:
            self.stat = torch.gather(self.stat, -1, index)
        self.evictions += 1

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (or reorder, or repeat) batch rows, as beam search and batch filtering need."""
        for name in ("keys", "values", "slots", "stat"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
