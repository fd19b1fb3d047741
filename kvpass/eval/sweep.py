"""Budget sweeps that share one prefill across every (method, budget) pair.

Cache-eviction methods never change the prefill's own outputs (DESIGN invariant 2), so
a prompt can be prefilled once, recording each layer's K/V and every attention statistic
a method may ask for; each (method, budget) then starts from that recording, evicts,
and decodes. This is what makes a 7-method x 3-budget x 2-mode passkey table affordable
on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import DynamicCache

from kvpass.kernels import ops
from kvpass.methods import Method, Stat
from kvpass.planning import Plan
from kvpass.hf_attention import attention_implementation
from kvpass.runtime.hf import KVPassCacheLayer
from kvpass.runtime.ragged_cache import site_cache_from_prefill
from kvpass.runtime.reallocation import ReallocationPolicy, Reallocator

RECORDER = "kvpass_record"
STAT_WINDOW = 32


@dataclass
class LayerRecording:
    keys: torch.Tensor
    values: torch.Tensor
    stats: dict[Stat, torch.Tensor]


@dataclass
class PrefillRecording:
    """Per-layer K/V and statistics of one prefill (batch 1, no padding)."""

    layers: dict[int, LayerRecording] = field(default_factory=dict)


_active: list[dict[int, PrefillRecording]] = []


def _record_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention implementation that also records what every method could need, at every cut.

    The queries are split into segments at the recorded prefix lengths; each segment attends
    to the keys up to its end, so one pass yields the output and every prefix's column sums
    (a prefix's sums are those of its segments). Window and last-query statistics only involve
    the last queries of a prefix, so they are recomputed for those alone.
    """
    batch, _, length, _ = query.shape
    recordings = _active[-1]
    slots = torch.arange(length, dtype=torch.int32)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    def run(first_query: int, end: int, stat: Stat):
        q_slots = slots[first_query:end].expand(batch, end - first_query).contiguous()
        k_slots = slots[:end].expand(batch, key.shape[1], end).contiguous()
        return ops.attention(query[:, :, first_query:end], key[:, :, :end], value[:, :, :end], q_slots, k_slots,
                             scale, True, stat.value, STAT_WINDOW)

    outputs, column_sum, start = [], None, 0
    for end in sorted(recordings):
        out, segment_sum = run(start, end, Stat.COLUMN_SUM)
        outputs.append(out)
        column_sum = segment_sum if column_sum is None else segment_sum + torch.nn.functional.pad(
            column_sum, (0, end - column_sum.shape[-1]))
        stats = {
            Stat.COLUMN_SUM: column_sum,
            Stat.WINDOW: run(max(end - STAT_WINDOW, 0), end, Stat.WINDOW)[1],
            Stat.LAST_QUERY: run(end - 1, end, Stat.LAST_QUERY)[1],
        }
        recordings[end].layers[module.layer_idx] = LayerRecording(key[:, :, :end], value[:, :, :end], stats)
        start = end
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def record_prefixes(model, input_ids: torch.Tensor, lengths: Sequence[int]) -> dict[int, PrefillRecording]:
    """One prefill of `input_ids` [1, L] through optimized `model`, recorded as if each prefix
    `input_ids[:, :n]` for n in `lengths` had been prefilled alone.

    Causal attention makes a prefix's keys, values and outputs those of the whole prompt cut
    short; only its statistics differ, and they are computed per prefix. This is how the
    query-aware (whole prompt) and context-only (context alone) modes share one prefill.

    Example:
        >>> recs = record_prefixes(model, prompt_ids[:, :-1], [context_len, prompt_len - 1])  # doctest: +SKIP
    """
    length = input_ids.shape[-1]
    cuts = sorted(set(lengths))
    if not cuts or cuts[0] < 1 or cuts[-1] > length:
        raise ValueError(f"lengths={list(lengths)} must lie within 1..{length} (the prompt's length)")
    if cuts[-1] != length:
        input_ids = input_ids[:, : cuts[-1]]
    _active.append({n: PrefillRecording() for n in cuts})
    try:
        with attention_implementation(model, RECORDER, _record_attention), torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
        return _active[-1]
    finally:
        _active.pop()


def record_prefill(model, input_ids: torch.Tensor) -> PrefillRecording:
    """Prefill `input_ids` [1, L] through `model`, recording every layer (stats window: 32)."""
    return record_prefixes(model, input_ids, [input_ids.shape[-1]])[input_ids.shape[-1]]


def cache_from_recording(model, recording: PrefillRecording, plan: Plan) -> DynamicCache:
    """A DynamicCache of kvpass layers for optimized `model`, evicted from the recording under `plan`."""
    modules = dict(model.named_modules())
    by_layer = {modules[site.name].layer_idx: site for site in model.kvpass_sites}
    dtype_bytes = next(model.parameters()).element_size()
    order = sorted(recording.layers)
    reallocator = (Reallocator(ReallocationPolicy.from_plan(plan, [by_layer[i].name for i in order], dtype_bytes))
                   if plan.reallocate else None)
    layers = []
    for position, index in enumerate(order):
        layer = recording.layers[index]
        site = by_layer[index]
        method: Method | None = plan.method
        stat = layer.stats.get(method.stat) if method is not None and method.stat is not Stat.NONE else None
        site_cache = site_cache_from_prefill(
            plan.schedule(site, dtype_bytes), plan.head_schedule(site, dtype_bytes), method, site.group_size,
            layer.keys, layer.values, stat, reallocator, position,
        )
        layers.append(KVPassCacheLayer(site_cache, site))
    cache = DynamicCache()
    cache.layers = layers
    return cache
