"""The eviction arithmetic of a site whose KV heads hold different numbers of tokens (a ragged cache).

Two decisions make heads differ: per-head budgets (`kvpass.Evict(per_head=True)`, AdaKV: the
layer's budget goes to whichever heads' tokens score best, in one joint top-k; or, with
`head_allocation="calibrated"`, fixed shares per head chosen at compile time from calibration's
per-head error curves) and streaming heads (`kvpass.StreamingHeads`, DuoAttention: some heads keep
only sinks and a recent window).
The cache then stores every (sequence, KV head) segment packed one after the other, so a head
costs exactly the rows it holds: K, V, an int32 slot and the method's statistic per row, plus
one int32 length per head. Tokens appended since the last eviction wait in a tail that every
head shares (K, V and statistic per head, one slot per token), and are merged in at the next; the
cap counts them as rows of every head (`append_bytes`), which is how the ONNX graph stores them.

The byte cap is the one a uniform cache at the same budget has, `SiteSchedule.cap(seen)` tokens
per head at `kv + state` bytes each, counted over the layer instead of per head: an eviction at
`seen` keeps at most `rows(seen)` rows, few enough that the cap still holds after the next
`evict_every - 1` appends. Like `SiteSchedule`, every method takes an int `seen` (the runtime)
or a sympy expression (the cost model), so both are one piece of code.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from kvpass.cost import smax, smin, where
from kvpass.planning.schedule import SLOT_BYTES, SiteSchedule

LENGTH_BYTES = 4
"""Each (sequence, KV head) segment of a ragged cache stores its length as one int32."""
SHARE_UNIT = 64
"""Fixed per-head shares are whole 1/SHARE_UNIT parts of an equal share (`HeadSchedule.shares`)."""


@dataclass(frozen=True)
class HeadSchedule:
    """How many rows a ragged cache of one site keeps, and how they are split between its KV heads.

    Example:
        >>> base = SiteSchedule(fraction=0.5, kv_bytes_per_token=1536, state_bytes_per_token=24)
        >>> heads = HeadSchedule(base, kv_heads=3, head_bytes=512, stat_bytes=4, joint=True)
        >>> heads.rows(1000), 3 * base.target(1000)   # the heads' lengths take one row's bytes
        (1475, 1476)
        >>> HeadSchedule(base, 3, 512, 4, streaming=(1,)).held_bytes(1000) <= 0.5 * 1000 * 1536
        True
    """

    base: SiteSchedule
    """The per-head arithmetic of a uniform cache at the same budget: byte cap, carve-outs, pages, cadence."""
    kv_heads: int
    head_bytes: int
    """K and V bytes of one token in one head."""
    stat_bytes: int
    """Bytes of the method's statistic per row (0: the method keeps none, or nothing is evicted by score)."""
    streaming: tuple[int, ...] = ()
    """Positions (among the cache's KV heads) of the heads that keep only sinks and a recent window."""
    streaming_sinks: int = 4
    streaming_recent: int = 64
    joint: bool = False
    """The other heads share their rows by one joint top-k over the layer (AdaKV) instead of equally."""
    head_floor: float = 0.2
    """With `joint`: each head first keeps its best `head_floor` share of an equal split (past its carve-outs)."""
    shares: tuple[int, ...] = ()
    """With `joint`: each budgeted head's fixed part of an equal split (past its carve-outs), in
    1/SHARE_UNIT units summing to at most SHARE_UNIT per budgeted head, in place of `head_floor`;
    the joint top-k hands out only what rounding leaves. Empty: `head_floor` for every head."""

    @property
    def prunes(self) -> bool:
        """A ragged cache always evicts something (the cost model's question)."""
        return True

    @property
    def budgeted(self) -> int:
        """Heads that keep budgeted tokens (not streaming)."""
        return self.kv_heads - len(self.streaming)

    @property
    def row_bytes(self) -> int:
        """Bytes of one packed row: K, V, slot, statistic."""
        return self.head_bytes + SLOT_BYTES + self.stat_bytes

    @property
    def append_bytes(self) -> int:
        """Bytes one appended token is counted for until the next eviction: a row in every head (K, V,
        statistic, slot), as the ONNX graph stores it; torch's tail stores one slot per token, a few
        bytes less, so the one rule keeps both runtimes under the cap and their tokens equal."""
        return self.kv_heads * self.row_bytes

    @property
    def bookkeeping_bytes(self) -> int:
        """Bytes per sequence besides the rows: the heads' lengths."""
        return self.kv_heads * LENGTH_BYTES

    def byte_cap(self, seen):
        """Most bytes one sequence's cache may hold once `seen` tokens have been seen."""
        return self.base.cap(seen) * (self.base.kv_bytes_per_token + self.base.state_bytes_per_token)

    def rows(self, seen):
        """Most rows an eviction at `seen` keeps, so the cap holds until `evict_every - 1` more appends."""
        spare = [(self.byte_cap(seen + j) - self.bookkeeping_bytes - j * self.append_bytes) // self.row_bytes
                 for j in range(self.base.evict_every)]
        return smax(0, smin(*spare))

    def streaming_window(self, rows) -> tuple:
        """(sinks, recent) each streaming head keeps when the layer keeps `rows`: its window, but
        never more than an equal share of the rows (sinks first, as every carve-out)."""
        window = smin(self.streaming_sinks + self.streaming_recent, rows // self.kv_heads)
        sinks = smin(self.streaming_sinks, window)
        return sinks, window - sinks

    def equal_quota(self, spare):
        """Uniform split: tokens each budgeted head keeps out of `spare` rows, whole pages past its carve-outs."""
        keep = spare // self.budgeted
        return self._pages(keep, sum(self.base.carve_out(keep)))

    def joint_split(self, spare) -> tuple:
        """Joint split of `spare` rows: (tokens each budgeted head keeps first, rows the joint top-k
        hands out on top). First come the carve-outs of an equal share and `head_floor` of what is
        left of it (or the head's fixed `shares` of it); the rest, in whole pages, goes to the
        best-scored tokens of any head."""
        share = spare // self.budgeted
        carved = sum(self.base.carve_out(share))
        parts = self.shares or (Fraction(self.head_floor) * SHARE_UNIT,) * self.budgeted
        firsts = tuple(carved + self._pages(part * (share - carved) // SHARE_UNIT, 0) for part in parts)
        return firsts, self._pages(spare - sum(firsts), 0)

    def _pages(self, keep, carved):
        """`keep` rounded down to whole pages past `carved`."""
        page = self.base.page_size
        return keep if page == 1 else carved + (keep - carved) // page * page

    def split(self, spare) -> tuple:
        """(tokens each budgeted head keeps first, one per head; rows handed out on top) of `spare`
        rows: the joint split, or an equal quota each and nothing on top."""
        return self.joint_split(spare) if self.joint else ((self.equal_quota(spare),) * self.budgeted, 0)

    def eviction_sizes(self, seen: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """What an eviction at `seen` works with: (rows it keeps at most, each streaming head's (sinks,
        recent), the carve-outs (sinks, recent) the budgeted heads' ranking protects)."""
        rows = self.rows(seen)
        window = self.streaming_window(rows)
        if self.budgeted == 0:
            return rows, window, (0, 0)
        nominal = rows - len(self.streaming) * min(seen, sum(window))
        share = nominal // self.budgeted if self.joint else self.equal_quota(nominal)
        return rows, window, self.base.carve_out(share)

    def split_table(self, rows: int, counts) -> list[tuple[int, ...]]:
        """Row c: `split(rows - c)` flattened (each budgeted head's first tokens, then the rows on
        top) for every count c of `counts` (rows the streaming heads of a sequence keep), zeros
        elsewhere: the table the keep rule indexes per sequence."""
        table = [(0,) * (self.budgeted + 1)] * (max(counts, default=0) + 1)
        for count in set(counts) if self.budgeted else ():
            firsts, extra = self.split(rows - count)
            table[count] = tuple(map(int, (*firsts, extra)))
        return table

    def wanted(self, counts: list[list[int]]) -> int:
        """Rows the longest sequence would keep if nothing capped it, from each (sequence, head)'s
        real tokens: budgeted heads all of them, streaming heads their window."""
        window = self.streaming_sinks + self.streaming_recent
        return max(sum(min(c, window) if head in self.streaming else c for head, c in enumerate(row))
                   for row in counts)

    def due(self, seen: int, tail: int, packed_rows: int | None, wanted: int) -> bool:
        """Whether an eviction falls due once `seen` tokens have been seen, the last `tail` of them
        appended since the last eviction. `packed_rows`: rows the longest sequence holds packed (None
        before the first eviction); `wanted`: `wanted(...)` of the cache now. Evict when over the cap
        (appended tokens counted at `append_bytes`), or when the tail is `evict_every` tokens and
        packing keeps every wanted row."""
        if tail == 0:
            return False
        held = (packed_rows or 0) * self.row_bytes + self.bookkeeping_bytes + tail * self.append_bytes
        if held > self.byte_cap(seen):
            return True
        return tail >= self.base.evict_every and self.rows(seen) >= wanted

    def held_rows(self, seen):
        """Rows one sequence (no padding) keeps after an eviction at `seen`."""
        rows = self.rows(seen)
        streaming = len(self.streaming) * smin(seen, sum(self.streaming_window(rows)))
        spare = rows - streaming
        if self.budgeted == 0:
            return streaming
        if self.joint:
            firsts, extra = self.joint_split(spare)
            budgeted = smin(self.budgeted * seen, sum(smin(seen, first) for first in firsts) + extra)
        else:
            budgeted = self.budgeted * smin(seen, self.equal_quota(spare))
        return streaming + budgeted

    def wanted_rows(self, seen):
        """Rows one sequence keeps when nothing caps it: budgeted heads everything, streaming heads their window."""
        return self.budgeted * seen + len(self.streaming) * smin(seen, self.streaming_sinks + self.streaming_recent)

    def held_bytes(self, seen, batch=1):
        """Bytes the cache holds right after a prefill of `seen` tokens (no padding), `batch` sequences.

        Before its first eviction the cache is the tail alone (K, V and statistic, slots implied);
        a prefill evicts when it is over the cap, or when it is at least `evict_every` tokens and
        packing it keeps every row the heads want (streaming heads at a budget of 1)."""
        whole = seen * self.kv_heads * (self.head_bytes + self.stat_bytes)
        packed = self.held_rows(seen) * self.row_bytes + self.bookkeeping_bytes
        over = seen * self.append_bytes + self.bookkeeping_bytes > self.byte_cap(seen)
        trims = (seen >= self.base.evict_every) & (self.rows(seen) >= self.wanted_rows(seen))
        return batch * where(over | trims, packed, whole)
