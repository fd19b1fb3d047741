"""The compacted KV cache of one attention site: physically smaller tensors, logical slots.

This is the pruned-KV contract of DESIGN.md in one class, independent of any model
library: new K/V are appended, attention runs over what is kept, and whenever the bytes
held exceed the site's cap the lowest-ranked tokens are gathered away into new, smaller
tensors (the old ones are released; nothing is masked to pretend).

Each kept token remembers its logical slot (position in the sequence), so causality for
appended tokens and padding stay right after eviction. Slots are only stored once they
stop being `first..first+T-1` (after the first eviction, or once a call's tokens have gaps),
so an unpruned cache costs exactly the bytes of its K and V.

Per-sequence state that a transform keeps beside a site's tokens (token filtering's anchors)
lives in `state`, so it lives and dies with this cache (one per call of the model), follows
its batch rows and counts in its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

from kvpass.errors import UnsupportedModelError
from kvpass.kernels import ops
from kvpass.methods import Method, Observation, Stat
from kvpass.methods.selection import EVICT_FIRST, ranking_scores
from kvpass.planning import SiteSchedule
from kvpass.runtime.reallocation import measure

if TYPE_CHECKING:
    from kvpass.runtime.reallocation import Reallocator


@dataclass(frozen=True)
class TokenPositions:
    """Where one call's tokens sit in the sequence, when some were pruned before reaching the cache.

    Example:
        >>> TokenPositions(torch.tensor([[0, 1, 4, 5]]), span=6).span   # tokens 2 and 3 were pruned
        6
    """

    offsets: torch.Tensor
    """int [B, L]: each appended token's position relative to the first position of the call."""
    span: int
    """Positions the call covers (kept and pruned tokens): what the logical length grows by."""
    padding: torch.Tensor | None = None
    """bool [B, L]: True for padding tokens (and any other appended token no query may see)."""
    queries: torch.Tensor | None = None
    """int [B, Lq]: the queries' positions relative to the call's first position, when they are not
    the appended tokens (token filtering: a prefill's filtered queries are skipped while their keys
    stay, or a decode step's query attends while its key is not cached). None: the appended tokens'."""


class SequenceState(Protocol):
    """Per-sequence state a transform keeps in a site's cache (`CompactedKV.state`)."""

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it holds, for byte accounting."""

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (or reorder, or repeat) batch rows."""


class CompactedKV:
    """One site's cache. Call `extend` with the new K/V, then `attend` with the queries.

    `method` None: a cache that never evicts (its schedule must not prune)."""

    def __init__(self, schedule: SiteSchedule, method: Method | None, group_size: int,
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
        """int32 [B, Hkv, T] logical positions, or None while they are simply first..first+T-1."""
        self.first = 0
        """The slot of the first cached token while `slots` is None (a sliding window moves it on)."""
        self.stat: torch.Tensor | None = None
        """float32 [B, Hkv, T] running attention statistic, for methods that use one."""
        self.seen = 0
        self.pending = 0
        self.evictions = 0
        self.state: dict[str, SequenceState] = {}
        """Per-sequence state of the transforms acting at this site, by transform name."""

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
        cache._fit_schedule()
        cache.stat = stat if cache.stat_mode is not Stat.NONE else None
        if cache.seen > cache.schedule.cap(cache.seen):
            batch, hkv = keys.shape[:2]
            cache._evict(cache._past_slots(batch, hkv, cache.seen, keys.device))
        return cache

    @property
    def stat_mode(self) -> Stat:
        return self.method.stat if self.schedule.prunes and self.method is not None else Stat.NONE

    @property
    def batch_size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    def head_lengths(self) -> torch.Tensor:
        """[B, Hkv] tokens each KV head holds (all alike)."""
        return torch.full(self.keys.shape[:2], self.keys.shape[-2], dtype=torch.long, device=self.keys.device)

    def head_slots(self) -> list[list[torch.Tensor]]:
        """[B][Hkv] the slots each (sequence, KV head) holds, in cache order (as `RaggedKV.head_slots`)."""
        batch, heads, length = self.keys.shape[:3]
        slots = self._past_slots(batch, heads, length, self.keys.device)
        return [[slots[row, head] for head in range(heads)] for row in range(batch)]

    def empty(self) -> "CompactedKV":
        """A new, empty cache like this one (no state)."""
        return CompactedKV(self.schedule, self.method, self.group_size, self.reallocator, self.index)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Take over a filled uniform cache [B, Hkv, T, D] holding the last T of `seen` tokens
        (contiguous slots; a sliding layer holds its window only)."""
        self.keys, self.values, self.seen = keys, values, seen
        self.first = seen - keys.shape[-2]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (its transforms' state included), for byte accounting."""
        held = [t for t in (self.keys, self.values, self.slots, self.stat) if t is not None]
        return held + [t for state in self.state.values() for t in state.tensors()]

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

    def forget(self, position: int, key_padding: torch.Tensor | None = None) -> bool:
        """Let go of the token at logical `position` (token filtering's deferred decode decisions): the
        tensors shrink by it in every batch row and head, and slots are stored from then on, since they have
        a gap. Nothing changes, and False is returned, unless every row and head holds it (an eviction may
        have taken it already). `key_padding` [B, seen]: the sequence's padding, to label the slots when none
        were stored."""
        batch, hkv, total, dim = self.keys.shape
        if self.pending:
            raise RuntimeError("CompactedKV.forget called between extend and attend")
        slots = self._past_slots(batch, hkv, total, self.keys.device, key_padding)
        held = slots == position
        if not bool((held.sum(-1) == 1).all()):
            return False
        index = torch.sort(held.int(), dim=-1, stable=True).indices[..., :total - 1]  # the others, in order
        self.slots = slots.gather(-1, index)
        self.keys = self.keys.gather(2, index[..., None].expand(-1, -1, -1, dim))
        self.values = self.values.gather(2, index[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        if self.stat is not None:
            self.stat = self.stat.gather(-1, index)
        return True

    def attend(
        self, q: torch.Tensor, scale: float, causal: bool = True, key_padding: torch.Tensor | None = None,
        model_mask: torch.Tensor | None = None, softcap: float = 0.0, sinks: torch.Tensor | None = None,
        positions: TokenPositions | None = None,
    ) -> torch.Tensor:
        """Attention of `q` [B, Hq, L, D] over the cache, then eviction if over the cap.

        `key_padding` [B, seen + L] marks which tokens of the sequence so far are padding (the
        model's mask). Until its first eviction the cache holds its tokens in sequence order and
        stores no slots, so the mask labels all of them at every call (an unpruned cache costs
        exactly its K and V, padding or not); once slots are stored, kept tokens carry their
        padding in their slots and only the appended ones are read. `positions`: where the
        appended tokens sit in the sequence when they are not simply the next L (tokens were
        pruned before reaching this cache; the logical length grows by its span, and from then on
        slots are stored, since they have gaps; `positions.queries` says where the queries sit when
        they are not the appended tokens). `model_mask` [B, 1 or Hkv, L, seen + L] is the
        model's own mask over logical positions (bool, or float added to the logits), applied at
        the slots the cache holds; `softcap` and `sinks` are the model's logit soft-capping and
        sink logits (`kvpass.kernels.reference.attention`).
        """
        batch, hkv, total, _ = self.keys.shape
        start, new = self.seen, self.pending
        queries = None
        span = new if positions is None else positions.span
        self._fit_schedule()
        if self.reallocator is not None:
            self.schedule = replace(self.schedule, fraction=self.reallocator.fraction(self.index, start + span))
        if positions is not None and self.slots is None:
            self.slots = self._past_slots(batch, hkv, total - new, q.device, key_padding)
        stored = self.slots is not None
        if positions is None:
            appended = torch.arange(start, start + new, device=q.device, dtype=torch.int32).expand(batch, new)
            labelled = (appended[0] if stored else torch.arange(self.first, self.first + total, device=q.device,
                                                                dtype=torch.int32)).expand(batch, hkv, -1)
            padding = None if key_padding is None else key_padding[:, -labelled.shape[-1]:]
        else:
            appended = (positions.offsets.to(device=q.device, dtype=torch.int32) + start).expand(batch, new)
            labelled = appended[:, None, :].expand(batch, hkv, new)
            padding = positions.padding
            if positions.queries is not None:
                queries = (positions.queries.to(device=q.device, dtype=torch.int32) + start).expand(batch, -1)
        if padding is not None:
            labelled = torch.where(padding[:, None, :], -1 - labelled, labelled)
        k_slots = torch.cat([self.slots, labelled], dim=-1) if stored else labelled.contiguous()
        if stored:
            self.slots = k_slots
        if model_mask is not None:
            model_mask = self._mask_at_slots(model_mask, k_slots)
        out, stat = ops.attention(
            q, self.keys, self.values, (appended if queries is None else queries).contiguous(), k_slots, scale, causal,
            self.stat_mode.value, self.method.window if self.method is not None else 0, model_mask, softcap, sinks,
        )
        self.seen += span
        self.pending = 0
        if self.stat_mode is not Stat.NONE:
            self._accumulate(stat, new)
        if self.reallocator is not None and self.reallocator.due(self.seen, new):
            self.reallocator.observe(self.index, measure(self, q, k_slots, scale, self._ranking(k_slots)), self.seen)
        if total > self.schedule.cap(self.seen):
            self._evict(k_slots)
        return out

    def _fit_schedule(self) -> None:
        """Size the byte cap by the bytes a token of *this* cache takes: a model cast to another
        dtype after it was optimized (`.to(torch.float16)`) stores narrower K/V than the plan
        assumed, while slots and statistics keep their width, so fewer tokens fit the same fraction."""
        per_token = self.keys.shape[1] * (self.keys.shape[-1] * self.keys.element_size()
                                          + self.values.shape[-1] * self.values.element_size())
        if per_token != self.schedule.kv_bytes_per_token:
            self.schedule = replace(self.schedule, kv_bytes_per_token=per_token)

    def _past_slots(self, batch: int, hkv: int, length: int, device: torch.device,
                    key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """The stored slots, or first..first+length-1 when none were stored yet (padding, marked
        in `key_padding` [B, seen + new], as `-1 - slot`)."""
        if self.slots is not None:
            return self.slots
        slots = torch.arange(self.first, self.first + length, device=device, dtype=torch.int32)
        slots = slots.expand(batch, hkv, length)
        if key_padding is not None and length:
            slots = torch.where(key_padding[:, None, self.first:self.first + length], -1 - slots, slots)
        return slots.contiguous()

    def _mask_at_slots(self, mask: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
        """The model's mask over logical positions [B, 1 | Hkv | Hq, L, positions], read at each cached key's slot."""
        if mask.shape[-1] == k_slots.shape[-1]:
            return mask  # over the cached keys already (or nothing evicted yet: cache order is position order)
        if mask.shape[-1] != self.seen + self.pending:
            raise UnsupportedModelError(
                f"the model's attention mask covers {mask.shape[-1]} keys, neither the {k_slots.shape[-1]} cached "
                f"nor the {self.seen + self.pending} positions seen: kvpass cannot tell which key each column means")
        positions = torch.where(k_slots < 0, -1 - k_slots, k_slots).long()
        if mask.shape[1] not in (1, positions.shape[1]):  # per query head: each reads its KV head's slots
            positions = positions.repeat_interleave(mask.shape[1] // positions.shape[1], dim=1)
        batch, heads, tokens = positions.shape
        index = positions[:, :, None, :].expand(batch, heads, mask.shape[2], tokens)
        return torch.gather(mask.expand(batch, heads, *mask.shape[2:]), -1, index)

    def _accumulate(self, stat: torch.Tensor, new: int) -> None:
        if self.stat is None or self.stat_mode is Stat.LAST_QUERY:
            self.stat = stat
            return
        grown = torch.nn.functional.pad(self.stat, (0, new))
        self.stat = self.stat_mode.combine(grown, stat)

    def _ranking(self, k_slots: torch.Tensor) -> torch.Tensor:
        """Every cached token's score as the next eviction will rank it; a windowed site's tokens
        that left its window go first."""
        sinks, recent = self.schedule.carve_out(self.schedule.kept(self.seen))
        obs = Observation(self.keys, self.values, k_slots, self.stat, self.seen, self.group_size)
        scores = ranking_scores(self.method, obs, sinks, recent)
        if self.schedule.window is not None:
            scores = torch.where(k_slots < self.seen - self.schedule.window, EVICT_FIRST, scores)
        return scores

    def _evict(self, k_slots: torch.Tensor) -> None:
        keep = self.schedule.kept(self.seen)
        if self.slots is None and self.schedule.keeps_window(self.seen):
            # only the window bounds the site now: drop the oldest tokens, slots stay implicit
            drop = self.keys.shape[-2] - keep
            self.keys, self.values = self.keys[:, :, drop:].clone(), self.values[:, :, drop:].clone()
            self.stat = self.stat[..., drop:].clone() if self.stat is not None else None
            self.first += drop
            self.evictions += 1
            return
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
        for state in self.state.values():
            state.select_batch(index)
