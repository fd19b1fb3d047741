"""Greedy decoding with onnxruntime over a kvpass-pruned ONNX model.

The pruned graph evicts, but does not decide *how many* tokens stay: the host feeds one
(keep, sinks, recent, seen) row per pruned site, computed with the site's `SiteSchedule`
exactly as `kvpass.runtime.compacted_cache.CompactedKV` does, so the onnxruntime and torch
paths of one plan keep the same tokens. A row whose keep is the cache's length (no eviction
due, as between the evictions of `evict_every` > 1) takes the graph's append-only branch.
Everything else (scores, top-k, compaction, slots) runs inside the graph.

A graph of a ragged plan (per-head budgets, streaming heads), or of one whose layers keep different
numbers of tokens, carries its pruned sites' caches packed (`kvpass.rewrites.onnx_ragged`);
`kvpass.onnx.packed_site.PackedSite` holds each one and decides its evictions by the torch runtime's
rule (`RaggedKV`'s, or `CompactedKV`'s for heads that keep alike), so both keep the same tokens in
every head.

Padded batches (left padding) follow Hugging Face's `generate`: position ids count each row's
real tokens only, and the graph's `attention_mask` covers the physical cache, 0 where a row
still holds padding (its slots are negative; eviction drops padding first).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnxruntime as ort

from kvpass.errors import UnsupportedModelError
from kvpass.onnx import ModelLike, load
from kvpass.planning import SiteSchedule
from kvpass.rewrites.onnx import EVICT_INPUT, MASK_INPUT, METADATA_KEY, POSITION_INPUT
from kvpass.validation import integer

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def evict_row(schedule: SiteSchedule, total: int, seen: int) -> tuple[int, int, int, int]:
    """(keep, sinks, recent, seen) for a cache of `total` tokens after `seen` tokens: the
    torch runtime's rule: evict to `kept(seen)` only once `cap(seen)` is exceeded.

    Example:
        >>> evict_row(SiteSchedule(0.5, 256, 8), total=1000, seen=1000)
        (484, 4, 32, 1000)
    """
    keep = schedule.kept(seen) if total > schedule.cap(seen) else total
    return (int(keep), *map(int, schedule.carve_out(keep)), seen)


def default_providers() -> list[str]:
    """CUDA when this onnxruntime has it (`pip install kvpass[onnx-gpu]`), then the CPU.

    Example:
        >>> default_providers()[-1]
        'CPUExecutionProvider'
    """
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class Generator:
    """onnxruntime greedy loop over the compacted cache of a `kvpass.onnx.optimize`d model.

    After a call, `cache[layer]` holds that layer's (keys, values, slots) as numpy arrays
    (slots None for an unpruned layer), the physical cache the next step would read; in a ragged
    graph with packed caches the pruned layers are in `packed[layer]` instead (packed rows and
    per-head lengths).
    Eviction follows the model's schedule, `evict_every` included (`kvpass.onnx.optimize`):
    between evictions the graph only appends. `session_options` (threads, ...) go to onnxruntime;
    `providers` default to `default_providers()`: CUDA when onnxruntime-gpu is installed, else the CPU.

    Example:
        >>> gen = kvpass.onnx.Generator("model.pruned.onnx")            # doctest: +SKIP
        >>> gen.generate(input_ids, max_new_tokens=32)                  # doctest: +SKIP
        array([[ 1, 17, ...]])
    """

    def __init__(self, path_or_model: ModelLike, providers: list[str] | None = None,
                 session_options: ort.SessionOptions | None = None):
        proto = load(path_or_model)
        meta = {entry.key: entry.value for entry in proto.metadata_props}.get(METADATA_KEY)
        if meta is None:
            raise ValueError("path_or_model: no kvpass metadata in this ONNX model; produce it with "
                             "kvpass.onnx.optimize or kvpass.export_onnx")
        meta = json.loads(meta)
        self.sites = meta["sites"]
        self.packed_caches = bool(meta.get("packed"))
        """The graph carries packed caches (per-head budgets, streaming heads, layers of different
        budgets): `packed` holds them."""
        self.packed: dict = {}
        """Layer -> `kvpass.onnx.packed_site.PackedSite` of each pruned site of a ragged graph."""
        stale = [site["name"] for site in self.sites if site["row"] is not None and "evicted_key" not in site
                 and not self.packed_caches]
        if stale:
            raise ValueError(f"path_or_model: the pruned sites {stale} return their compacted cache as `present` "
                             "(an older kvpass's rewrite); prune the unpruned graph again with kvpass.onnx.optimize")
        self.schedules = {site["layer"]: SiteSchedule(**site["schedule"]) for site in self.sites}
        self.providers = default_providers() if providers is None else list(providers)
        """The execution providers asked for, in order (`session.get_providers()`: those onnxruntime took)."""
        if session_options is not None and not isinstance(session_options, ort.SessionOptions):
            raise TypeError("session_options must be an onnxruntime.SessionOptions, "
                            f"got {type(session_options).__name__}")
        options = session_options or ort.SessionOptions()  # default: every graph optimization
        source = path_or_model if not hasattr(path_or_model, "SerializeToString") else proto.SerializeToString()
        self.session = ort.InferenceSession(source, options, providers=self.providers)
        types = {i.name: i.type for i in self.session.get_inputs()}
        first = self.sites[0]
        self.kv_dtype = _NUMPY_TYPES[types[first.get("past_packed_key", first["past_key"])]]
        self.output_names = [o.name for o in self.session.get_outputs()]
        vocab = next((o.shape[-1] for o in self.session.get_outputs() if o.name == "logits"), None)
        self.vocab_size: int | None = vocab if isinstance(vocab, int) else None
        """Token ids must be below it (None when the graph does not fix it)."""
        self.takes_mask = MASK_INPUT in types
        self.cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self.stats: dict[int, np.ndarray] = {}
        """float32 [B, Hkv, T] per layer whose method sums attention over the steps (h2o, snapkv): the
        running statistic the graph carries beside the cache, counted in its bytes."""
        self.seen = 0
        self.padding = np.zeros((0, 0), bool)
        """[B, seen] True where a token of the sequence so far was padding."""
        self.next_position = np.zeros(0, np.int64)
        """[B] the position id each row's next real token takes (padding does not count)."""

    def reset(self, batch: int) -> None:
        """An empty cache for `batch` sequences."""
        self.seen = 0
        self.padding = np.zeros((batch, 0), bool)
        self.next_position = np.zeros(batch, np.int64)
        empty = lambda site: np.zeros((batch, site["kv_heads"], 0, site["head_dim"]), self.kv_dtype)  # noqa: E731
        self.cache = {
            site["layer"]: (empty(site), empty(site),
                            np.zeros((batch, site["kv_heads"], 0), np.int32) if site["row"] is not None else None)
            for site in self.sites
        }
        self.stats = {site["layer"]: np.zeros((batch, site["kv_heads"], 0), np.float32)
                      for site in self.sites if "past_stat" in site}
        if self.packed_caches:
            from kvpass.onnx.packed_site import PackedSite

            self.packed = {site["layer"]: PackedSite(site, batch, self.kv_dtype)
                           for site in self.sites if "present_lengths" in site}
            for layer in self.packed:
                del self.cache[layer]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Feed `input_ids` [B, L] after what was seen so far; returns logits [B, L, vocab].

        `attention_mask` [B, L] (1 real, 0 padding) marks the padding among these tokens; padding
        must come before a row's real tokens (left padding)."""
        input_ids = self._token_ids(input_ids)
        batch, new = input_ids.shape
        held = {keys.shape[0] for keys, _, _ in self.cache.values()} | {
            site.lengths.shape[0] for site in self.packed.values()}
        if held != {batch}:
            raise ValueError(f"input_ids has {batch} rows but the cache holds {sorted(held) or 'none'}: "
                             "call reset(batch) first")
        real = self._new_tokens_mask(attention_mask, input_ids.shape)
        positions = self.next_position[:, None] + np.cumsum(real, axis=1) - 1
        feeds = {"input_ids": input_ids, POSITION_INPUT: np.where(real, positions, 0)}
        if self.packed_caches:
            feeds.update(self._packed_feeds(real))
        elif self.takes_mask:
            feeds[MASK_INPUT] = np.concatenate([self._held_mask(), real], axis=1).astype(np.int64)
        rows, evicting = [], {}
        for site in self.sites:
            if site["layer"] in self.packed:
                continue
            keys, values, slots = self.cache[site["layer"]]
            feeds[site["past_key"]], feeds[site["past_value"]] = keys, values
            if site["row"] is not None:
                feeds[site["past_slots"]] = slots
                if "past_stat" in site:
                    feeds[site["past_stat"]] = self.stats[site["layer"]]
                total = keys.shape[2] + new
                rows.append(evict_row(self.schedules[site["layer"]], total, self.seen + new))
                evicting[site["layer"]] = rows[-1][0] < total  # the graph's own test: keep < cache length
        if rows:
            feeds[EVICT_INPUT] = np.array(rows, dtype=np.int64).reshape(len(rows), 4)
        out = dict(zip(self.output_names, self.session.run(None, feeds)))
        self.seen += new
        self.padding = np.concatenate([self.padding, ~real], axis=1)
        self.next_position = self.next_position + real.sum(axis=1)
        for site in self.sites:
            if site["layer"] in self.packed:
                self.packed[site["layer"]].update(out)
                continue
            cache = "evicted" if evicting.get(site["layer"]) else "present"
            slots = out[site["present_slots"]] if site["row"] is not None else None
            self.cache[site["layer"]] = (out[site[f"{cache}_key"]], out[site[f"{cache}_value"]], slots)
            if "present_stat" in site:
                self.stats[site["layer"]] = out[site["present_stat"]]
        return out["logits"]

    def _new_tokens_mask(self, attention_mask: Any, shape: tuple[int, int]) -> np.ndarray:
        """bool [B, L], True for real tokens; checked: 0/1 values, left padding, no row all padding so far."""
        if attention_mask is None:
            return np.ones(shape, bool)
        mask = np.asarray(attention_mask.cpu() if hasattr(attention_mask, "cpu") else attention_mask)
        if mask.shape != shape or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"attention_mask must be 0/1 of the input_ids' shape {shape}, got shape {mask.shape}")
        real = mask.astype(bool)
        started = np.logical_or.accumulate(np.concatenate([self.next_position[:, None] > 0, real], axis=1), axis=1)
        if (started[:, :-1] & ~real).any():
            raise ValueError("attention_mask: padding after a row's real tokens; only left padding is supported")
        if not real[:, -1].all():
            raise ValueError("attention_mask: a row ends in padding (its next token would have nothing to follow)")
        grouped = [site["name"] for site in self.sites if site.get("pattern") == "ms_group_query_attention"]
        if not real.all() and grouped:
            raise UnsupportedModelError(
                f"attention_mask: the com.microsoft GroupQueryAttention nodes {grouped} take each row's keys as the "
                "first seqlens_k + 1 of its cache (right padding), so a left-padded batch is outside what the op "
                "computes, pruned or not; decode such rows one at a time")
        if not real.all() and not self.takes_mask:
            raise ValueError("attention_mask: this ONNX graph takes no attention_mask input, so it cannot hide "
                             "padding; export it again with kvpass.export_onnx")
        return real

    def _packed_feeds(self, real: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs of a ragged graph's packed sites and its mask. Every layer reads the same width: the
        longest head of any layer; unpruned layers hold every token (so then the width is `seen`, and
        the mask's cached columns are theirs); packed sites mask by their own slots."""
        whole = [keys.shape[2] for keys, _, _ in self.cache.values()]
        width = max(whole + [site.width() for site in self.packed.values()], default=0)
        past = ~self.padding if whole else np.ones((real.shape[0], width), bool)
        feeds = {MASK_INPUT: np.concatenate([past, real], axis=1).astype(np.int64)}
        for site in self.packed.values():
            feeds.update(site.feeds(real, self.seen + real.shape[1], width))
        return feeds

    def _held_mask(self) -> np.ndarray:
        """bool [B, cached]: the cached tokens that are not padding, in cache order (the same in every layer)."""
        masks = [~self.padding if slots is None else slots[:, 0, :] >= 0 for _, _, slots in self.cache.values()]
        if any(m.shape != masks[0].shape or not np.array_equal(m, masks[0]) for m in masks[1:]):
            raise UnsupportedModelError(
                "attention_mask: the graph's one attention mask must fit every layer's cache, but this plan has "
                "layers holding different tokens (allocation='pyramid' or 'adaptive', or layers left unpruned), "
                "pruned by an older kvpass; prune the unpruned graph again with kvpass.onnx.optimize, which gives "
                "such plans packed caches")
        return masks[0]

    def cache_bytes(self) -> int:
        """Bytes the cache holds now: keys, values, slots and carried statistics of every layer."""
        held = sum(array.nbytes for layer in self.cache.values() for array in layer if array is not None)
        return held + sum(stat.nbytes for stat in self.stats.values()) + sum(
            site.nbytes() for site in self.packed.values())

    def full_cache_bytes(self) -> int:
        """Bytes the graph's unpruned cache would hold after the tokens seen so far (same batch, geometry, dtype)."""
        batch = len(self.next_position)
        elements = sum(2 * site["kv_heads"] * site["head_dim"] for site in self.sites)
        return batch * self.seen * elements * np.dtype(self.kv_dtype).itemsize

    def generate(self, input_ids, max_new_tokens: int, attention_mask=None, eos_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding: the prompt [B, L] (numpy or torch ids) plus up to `max_new_tokens` tokens.

        `attention_mask` [B, L] (numpy or torch, 1 real, 0 padding): a left-padded batch, decoded as
        Hugging Face's `generate` does (each row keeps the positions the torch path keeps for it).
        Sequences that hit `eos_token_id` are padded with it until all have finished.
        """
        ids = self._token_ids(input_ids)
        max_new_tokens = integer(max_new_tokens, "max_new_tokens", minimum=0)
        if eos_token_id is not None:
            eos_token_id = integer(eos_token_id, "eos_token_id", minimum=0)
        self.reset(ids.shape[0])
        tokens, done, chunk, mask = [ids], np.zeros(ids.shape[0], bool), ids, attention_mask
        for _ in range(max_new_tokens):
            next_token = self.step(chunk, mask)[:, -1].argmax(-1)
            mask = None
            if eos_token_id is not None:
                next_token = np.where(done, eos_token_id, next_token)
                done |= next_token == eos_token_id
            chunk = next_token[:, None].astype(np.int64)
            tokens.append(chunk)
            if done.all():
                break
        return np.concatenate(tokens, axis=1)

    def _token_ids(self, input_ids: Any) -> np.ndarray:
        """`input_ids` (numpy or torch) as int64 [batch, length > 0], every id in [0, vocab); a clear
        error naming input_ids otherwise (float ids are refused, not truncated)."""
        ids = np.asarray(input_ids.cpu() if hasattr(input_ids, "cpu") else input_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
        if ids.ndim != 2 or 0 in ids.shape:
            raise ValueError(f"input_ids must be [batch > 0, length > 0], got shape {ids.shape}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
            bound = f"[0, {self.vocab_size})" if self.vocab_size is not None else ">= 0"
            raise ValueError(f"input_ids must be token ids {bound}, got ids from {low} to {high}")
        return ids.astype(np.int64, copy=False)
