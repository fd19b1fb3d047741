"""Token filtering at one attention site: the runtime part of `kvpass.FilterTokens`.

Each call, the filter scores the new tokens' redundancy against the layer's running anchors
(`torch.ops.kvpass.kv_similarity`, fused by `kvpass.kernels.similarity.redundancy`) and decides
which are filtered:

* a call of several tokens (a prefill, or a later chunk) filters its `round(ratio x tokens)` most
  redundant eligible tokens (the online quantile of its own scores) and remembers the score of
  the last one filtered as the threshold;
* a single-token call (a decode step) filters its token when the score reaches the threshold,
  which then tracks the `ratio` quantile of the decode scores (Robbins–Monro): each step moves it
  up by `decode_step` x (1 - ratio) standard deviations of the prefill's scores when it filtered,
  down by `decode_step` x ratio when it kept, so the decode steps filter `ratio` of their tokens
  in the long run (`decode_step=0` freezes it at the prefill's quantile). A frozen threshold did
  not: decode tokens attend in every layer, while half the prefill's skipped attention in earlier
  filtered layers, so in deep layers their keys and values sit closer to the anchors than the
  prefill's did (SmolLM2, dev text, ratio 0.5: 0.6-0.97 of decode tokens filtered in the deeper
  tail layers, against 0.5 in the first).

What a prefill filters is said the way every pruning before attention says it, with the call's
`TokenPositions` (`kvpass.runtime.compacted_cache`): the cache is given only the kept tokens,
at their positions, so the filtered ones are gaps. A filtered token of a prefill does not
attend as a query in this layer (its attention output is zero, the residual stream carries
it); with `drop_kv` (default) its key and value are never stored either, so no query of the
layer sees it. `drop_kv=False` keeps the filtered tokens' keys and values and skips only their
queries (`TokenPositions.queries`).

A decode step's token always attends (it is the token being generated). With `drop_kv` and
`recent=0` (the default) a filtered one is never cached, so no query of the layer sees its key,
its own included. With `recent` above 0 it is cached and leaves the layer's cache `recent` steps
later (`CompactedKV.forget`), so the next tokens still see their immediate context, as every
eviction method's recent window lets them. Dropping at once costs continuation perplexity: on
SmolLM2 (test text, ratio 0.5) 42.7 with `recent=0` against 34.7 with 32 and 32.2 unfiltered. In a
batch a decode token leaves when every row filtered it; a row that filtered it alone keeps it
(the figures count what left). Without `drop_kv` a decode step filters nothing.

Tokens are eligible unless they are padding, among a row's first `protected` tokens (warm-up and
attention sinks; padding does not count), among a multi-token call's last `recent` tokens (the
window the first decode steps read), or have no anchor yet (the first token). The anchors,
the threshold and the rows' token counts are per-sequence state kept in the call's cache
(`FilterState`, in `CompactedKV.state`), so concurrent calls never mix and the bytes count in the
cache's cap. When the site's cap cannot hold them (a sequence whose first call is only a few
tokens long, under a small budget) the site stops filtering that sequence rather than break the cap.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvpass.kernels.similarity import redundancy
from kvpass.runtime.compacted_cache import CompactedKV, TokenPositions

ANCHOR_BYTES = 4
"""Anchors are float32."""
THRESHOLD_BYTES = 4
STEP_BYTES = 4
QUEUED_BYTES = 1
COUNT_BYTES = 4


@dataclass
class FilterState:
    """One batch of sequences' filtering state at one site, kept in the call's cache."""

    anchors_k: torch.Tensor | None
    """[B, Hkv, D] float32 moving average of the keys (None for fusion='random', which needs none)."""
    anchors_v: torch.Tensor | None
    seen: torch.Tensor | None
    """[B] int32: the row's tokens so far, padding not counted (its anchors exist once it is > 0)."""
    threshold: torch.Tensor | None
    """[B] float32: the last multi-token call's quantile, tracked by the decode steps since; +inf before one."""
    step: torch.Tensor | None
    """[B] float32: `decode_step` x the standard deviation of the last multi-token call's eligible scores."""
    queued: torch.Tensor | None
    """[B, n] bool, n <= recent: the decisions on the newest n decode tokens, oldest first."""
    tokens: int = 0
    """Non-padding tokens decided so far, summed over the rows."""
    filtered: int = 0
    active: bool = True
    """False once the site stopped filtering these sequences (its cap could not hold the state)."""

    @staticmethod
    def bytes_per_sequence(kv_heads: int, head_dim: int, anchors: bool, recent: int) -> int:
        """Bytes the state holds per sequence: what the plan reserves in the site's cap."""
        return ((2 * kv_heads * head_dim * ANCHOR_BYTES if anchors else 0) + THRESHOLD_BYTES + STEP_BYTES
                + COUNT_BYTES + recent * QUEUED_BYTES)

    def tensors(self) -> list[torch.Tensor]:
        held = (self.anchors_k, self.anchors_v, self.seen, self.threshold, self.step, self.queued)
        return [t for t in held if t is not None]

    def select_batch(self, index: torch.Tensor) -> None:
        for name in ("anchors_k", "anchors_v", "seen", "threshold", "step", "queued"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))

    def release(self) -> None:
        """Stop filtering: drop every tensor (the counts stay for the figures)."""
        self.anchors_k = self.anchors_v = self.seen = self.threshold = self.step = self.queued = None
        self.active = False


@dataclass(frozen=True)
class TokenFilter:
    """The token filter of one site (`kvpass.runtime.hf.TokenFilter`, passed as `kvpass_filter`)."""

    key: str
    """Where the filter keeps its `FilterState` in the cache's `state`."""
    layer: int
    ratio: float
    fusion: str
    gamma: float
    protected: int
    """A row's first tokens are never filtered (warm-up and attention sinks)."""
    recent: int
    """A filtered decode token leaves the cache this many steps later; a multi-token call's last tokens are kept."""
    drop_kv: bool
    seed: int
    decode_step: float
    """How far one decode decision moves the threshold, in standard deviations of the prefill's scores."""

    def __call__(self, cache: CompactedKV, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 positions: TokenPositions | None, padding: torch.Tensor | None,
                 attend: Callable[..., torch.Tensor]) -> torch.Tensor:
        state = self._state(cache, key)
        if not state.active:
            cache.extend(key, value)
            return attend(query, positions=positions)
        batch, length = key.shape[0], key.shape[-2]
        if positions is None:  # the next L positions
            call = TokenPositions(torch.arange(length, device=key.device, dtype=torch.int32), length,
                                  None if padding is None else padding[:, -length:])
        else:
            call = positions
        invalid = call.padding if call.padding is not None else torch.zeros(length, dtype=torch.bool, device=key.device)
        call = TokenPositions(call.offsets.expand(batch, length), call.span, invalid.expand(batch, length))
        valid = ~call.padding
        scores, eligible = self._score(cache, state, key, value, valid)
        state.tokens += int(valid.sum())
        if length > 1:
            state.queued = state.queued[:, :0]  # a new prompt: the queued decode tokens stay
            newest = valid.flip(-1).cumsum(-1).flip(-1) <= self.recent
            filtered = self._quantile(scores, eligible & ~newest, valid, state)
        else:
            filtered = eligible & (scores >= state.threshold[:, None])
            state.threshold = state.threshold + torch.where(
                eligible[:, 0], state.step * (filtered[:, 0].float() - self.ratio), 0.0)
        if length == 1 and (self.recent or not self.drop_kv):
            # a decode token is cached now: it leaves `recent` steps later if filtered (without drop_kv, never)
            cache.extend(key, value)
            out = attend(query, positions=positions)
            if self.drop_kv:
                self._queue(cache, state, filtered[:, 0], padding)
        else:
            state.filtered += int(filtered.sum())
            if bool(filtered.any()):
                out = self._attend_kept(cache, query, key, value, call, filtered, attend)
            else:
                cache.extend(key, value)
                out = attend(query, positions=positions)
        if not cache.schedule.holds_reserve(cache.seen):
            state.release()
        return out

    def _state(self, cache: CompactedKV, key: torch.Tensor) -> FilterState:
        state = cache.state.get(self.key)
        if state is None:
            batch, heads, _, dim = key.shape
            anchors = None if self.fusion == "random" else torch.zeros(batch, heads, dim, device=key.device)
            state = FilterState(anchors, None if anchors is None else anchors.clone(),
                                torch.zeros(batch, dtype=torch.int32, device=key.device),
                                torch.full((batch,), float("inf"), device=key.device),
                                torch.zeros(batch, device=key.device),
                                torch.zeros(batch, 0, dtype=torch.bool, device=key.device))
            cache.state[self.key] = state
        return state

    def _score(self, cache: CompactedKV, state: FilterState, key: torch.Tensor, value: torch.Tensor,
               valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Redundancy [B, L] of the new tokens and which of them may be filtered; updates the state."""
        earlier = state.seen[:, None] + torch.cumsum(valid.int(), -1) - 1   # the row's tokens before each
        eligible = valid & (earlier >= max(self.protected, 1))
        primed = state.seen > 0
        if self.fusion == "random":
            generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{self.layer}/{cache.seen}".encode()))
            scores = torch.rand(valid.shape, generator=generator).to(valid.device)
        else:
            sim_k, sim_v, state.anchors_k, state.anchors_v = torch.ops.kvpass.kv_similarity(
                key, value, state.anchors_k, state.anchors_v, valid, primed, self.gamma)
            scores = redundancy(sim_k, sim_v, self.fusion)
        state.seen = state.seen + valid.sum(-1, dtype=torch.int32)
        return scores, eligible

    def _quantile(self, scores: torch.Tensor, eligible: torch.Tensor, valid: torch.Tensor,
                  state: FilterState) -> torch.Tensor:
        """The `round(ratio x tokens)` most redundant eligible tokens of each row; sets the threshold."""
        count = torch.floor(self.ratio * valid.sum(-1) + 0.5).long()
        count = torch.minimum(count, eligible.sum(-1))
        ranked = torch.where(eligible, scores, float("-inf"))
        order = torch.sort(ranked, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order.indices).scatter_(-1, order.indices, torch.arange(
            ranked.shape[-1], device=ranked.device).expand_as(order.indices))
        last = order.values.gather(-1, (count - 1).clamp_min(0)[:, None])[:, 0]
        state.threshold = torch.where(count > 0, last, float("inf"))
        state.step = self.decode_step * _spread(scores, eligible)
        return eligible & (rank < count[:, None])

    def _queue(self, cache: CompactedKV, state: FilterState, filtered: torch.Tensor,
               padding: torch.Tensor | None) -> None:
        """Queue a decode token's decision [B] (the step's token sits at position `cache.seen - 1`); the one
        `recent` steps older leaves the cache when every row filtered it. `padding` [B, seen]: the sequence's,
        for the cache's slots."""
        queue = torch.cat([state.queued, filtered[:, None]], dim=-1)
        if queue.shape[-1] > self.recent:
            leaving, queue = queue[:, 0], queue[:, 1:]
            if bool(leaving.all()) and cache.forget(cache.seen - 1 - self.recent, padding):
                state.filtered += int(leaving.sum())
        state.queued = queue

    def _attend_kept(self, cache: CompactedKV, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     positions: TokenPositions, filtered: torch.Tensor,
                     attend: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Append the tokens the cache keeps and attend with the queries that attend; zeros for the others.
        `positions`: the call's, offsets and padding [B, L] spelled out.

        Batch rows keep different tokens but share one tensor: each row's entries are its kept
        tokens in order, padded to the longest row with invisible entries (as padding)."""
        everything = torch.ones_like(filtered)
        stored, stored_real = _rows(~filtered if self.drop_kv else everything)
        asked, asked_real = _rows(~filtered if key.shape[-2] > 1 else everything)  # a decode step attends
        invisible = ~stored_real | positions.padding.gather(-1, stored)
        cache.extend(_take(key, stored), _take(value, stored))
        out = attend(_take(query, asked), positions=TokenPositions(
            positions.offsets.gather(-1, stored), positions.span, invisible if bool(invisible.any()) else None,
            None if torch.equal(asked, stored) else positions.offsets.gather(-1, asked)))
        out = out * asked_real[:, None, :, None]
        return torch.zeros_like(query).scatter_(2, asked[:, None, :, None].expand_as(out), out)


def _spread(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """[B] standard deviation of each row's eligible scores (0 for a row with fewer than two)."""
    count = eligible.sum(-1).clamp_min(1)
    mean = torch.where(eligible, scores, 0.0).sum(-1) / count
    return (torch.where(eligible, scores - mean[:, None], 0.0).pow(2).sum(-1) / count).sqrt()


def _rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the positions where `mask` holds, in order, padded to the longest row with other
    positions (in order): index [B, M] and whether each entry is a real one."""
    index = torch.sort((~mask).int(), dim=-1, stable=True).indices[:, :int(mask.sum(-1).max())]
    return index, mask.gather(-1, index)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] at token positions `index` [B, M]."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))
