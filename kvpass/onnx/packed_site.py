"""The host side of one packed (ragged) site of a kvpass ONNX graph: its state, and when it evicts.

The graph (`kvpass.rewrites.onnx_ragged`) carries the site's cache packed: K, V, slots (and the
carried statistic) one row per kept token of each (sequence, KV head), and the lengths. It keeps
what it is told to: this object decides each step whether the site evicts, by the torch
runtime's own rule (`HeadSchedule.due` for ragged sites, as `RaggedKV`; `SiteSchedule` for the
sites whose heads keep alike, as `CompactedKV`), and feeds the sizes that rule computes.
"""

from __future__ import annotations

import numpy as np

from kvpass.onnx.generator import evict_row
from kvpass.planning import SiteSchedule
from kvpass.rewrites.onnx_ragged import PARAMETERS, head_schedule


class PackedSite:
    """One packed site's cache for `batch` sequences, fed to and read back from the graph.

    Example:
        >>> site = PackedSite(entry, batch=2, dtype=np.float32)     # doctest: +SKIP
        >>> feeds = site.feeds(real=np.ones((2, 5), bool), seen=5, width=0)   # doctest: +SKIP
    """

    def __init__(self, entry: dict, batch: int, dtype: type):
        self.entry = entry
        self.heads = head_schedule(entry["heads"]) if entry["heads"] is not None else None
        self.schedule = SiteSchedule(**entry["schedule"])
        dim, kv_heads = entry["head_dim"], entry["kv_heads"]
        self.keys = np.zeros((0, dim), dtype)
        self.values = np.zeros((0, dim), dtype)
        self.slots = np.zeros(0, np.int32)
        self.stat = np.zeros(0, np.float32) if "past_packed_stat" in entry else None
        self.lengths = np.zeros((batch, kv_heads), np.int32)
        """[B, Hkv] rows each (sequence, head) holds now."""
        self.packed_lengths: np.ndarray | None = None
        """The lengths right after the last eviction (None before it): what torch holds packed."""
        self.tail = 0
        """Tokens appended since the last eviction (torch's tail)."""
        self.tail_padding = np.zeros(batch, np.int64)
        """[B] padding tokens among them (torch's tail holds them until the eviction)."""
        self._pending: tuple | None = None

    def width(self) -> int:
        """The longest head's rows: how wide this site unpacks."""
        return int(self.lengths.max()) if self.lengths.size else 0

    def feeds(self, real: np.ndarray, seen: int, width: int) -> dict[str, np.ndarray]:
        """The graph inputs of this site for a step of `real` [B, L] tokens (False: padding), after which
        `seen` tokens have been seen, unpacked to `width`."""
        new = real.shape[1]
        tail, padding = self.tail + new, self.tail_padding + (~real).sum(axis=1)
        window, splits = (0, 0), None
        if self.heads is None:  # heads keep alike: CompactedKV's rule over the rows every head holds
            total = int(self.lengths[0, 0]) + new
            keep, sinks, recent, _ = evict_row(self.schedule, total, seen)
            evicting = keep < total
        else:
            held = self.packed_lengths if self.packed_lengths is not None else np.zeros_like(self.lengths)
            counts = (held + (tail - padding)[:, None]).tolist()
            packed_rows = int(self.packed_lengths.sum(1).max()) if self.packed_lengths is not None else None
            evicting = bool(self.heads.due(seen, tail, packed_rows, self.heads.wanted(counts)))
            rows, window, (sinks, recent) = self.heads.eviction_sizes(seen)
            keep = 0
            counts = self._streaming_counts(real, seen, window) if evicting else []
            splits = np.array(self.heads.split_table(rows, counts), np.int64).reshape(-1, self.heads.budgeted + 1)
        self._pending = (evicting, tail, padding)
        values = {"evicting": evicting, "seen": seen, "width": width, "keep": keep, "sinks": sinks, "recent": recent,
                  "streaming_sinks": window[0], "streaming_recent": window[1]}
        entry = self.entry
        feeds = {entry["past_packed_key"]: self.keys, entry["past_packed_value"]: self.values,
                 entry["past_packed_slots"]: self.slots, entry["past_lengths"]: self.lengths,
                 entry["params"]: np.array([int(values[name]) for name in PARAMETERS], np.int64)}
        if self.stat is not None:
            feeds[entry["past_packed_stat"]] = self.stat
        if splits is not None:
            feeds[entry["splits"]] = splits
        return feeds

    def _streaming_counts(self, real: np.ndarray, seen: int, window: tuple[int, int]) -> list[int]:
        """Per sequence, the rows its streaming heads keep at this step's eviction (their real tokens in
        the window), which index the keep rule's split table: the graph counts the same rows."""
        new, streaming = real.shape[1], self.heads.streaming
        if not streaming:
            return [0] * len(real)
        step = np.arange(seen - new, seen)
        step = np.where(real, step, -1 - step)
        counts = []
        for row, heads in enumerate(self.head_slots()):
            slots = np.concatenate([heads[head] for head in streaming] + [step[row]] * len(streaming))
            counts.append(int(((slots >= 0) & ((slots < window[0]) | (slots >= seen - window[1]))).sum()))
        return counts

    def update(self, out: dict[str, np.ndarray]) -> None:
        """Take the step's present packed cache from the graph's outputs `out`."""
        entry, (evicting, tail, padding) = self.entry, self._pending
        self.keys, self.values = out[entry["present_packed_key"]], out[entry["present_packed_value"]]
        self.slots, self.lengths = out[entry["present_packed_slots"]], out[entry["present_lengths"]]
        if self.stat is not None:
            self.stat = out[entry["present_packed_stat"]]
        if evicting:
            self.packed_lengths, self.tail, self.tail_padding = self.lengths.copy(), 0, 0 * padding
        else:
            self.tail, self.tail_padding = tail, padding

    def head_slots(self) -> list[list[np.ndarray]]:
        """[B][Hkv] the slots each (sequence, head) holds, in cache order."""
        ends = np.cumsum(self.lengths.reshape(-1))
        segments = np.split(self.slots, ends[:-1])
        heads = self.lengths.shape[1]
        return [segments[row * heads:(row + 1) * heads] for row in range(self.lengths.shape[0])]

    def nbytes(self) -> int:
        """Bytes held: rows (K, V, slot, statistic) and lengths."""
        held = [self.keys, self.values, self.slots, self.lengths] + ([self.stat] if self.stat is not None else [])
        return sum(array.nbytes for array in held)
