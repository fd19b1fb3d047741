"""Budget sweeps that share one prefill across every (method, budget) pair.

Cache-eviction methods never change the prefill's own outputs (DESIGN invariant 2), so
a prompt can be prefilled once, recording each layer's K/V and every attention statistic
a method may ask for; each (method, budget) then starts from that recording, evicts,
and decodes. This is what makes a 7-method x 3-budget x 2-mode passkey table affordable
on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


_active: list[PrefillRecording] = []


def _record_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention implementation that also records what every method could need.

    One full pass yields the output and the column sums; the window and last-query
    statistics only involve the last queries, so they are recomputed for those alone.
    """
    batch, _, length, _ = query.shape
    slots = torch.arange(length, dtype=torch.int32)
    k_slots = slots.expand(batch, key.shape[1], length).contiguous()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    def run(first_query: int, stat: Stat):
        q_slots = slots[first_query:].expand(batch, length - first_query).contiguous()
        return ops.attention(query[:, :, first_query:], key, value, q_slots, k_slots, scale, True, stat.value,
                             STAT_WINDOW)

    out, column_sum = run(0, Stat.COLUMN_SUM)
    stats = {
        Stat.COLUMN_SUM: column_sum,
        Stat.WINDOW: run(max(length - STAT_WINDOW, 0), Stat.WINDOW)[1],
        Stat.LAST_QUERY: run(length - 1, Stat.LAST_QUERY)[1],
    }
    _active[-1].layers[module.layer_idx] = LayerRecording(key, value, stats)
    return out.transpose(1, 2).contiguous(), None


def record_prefill(model, input_ids: torch.Tensor) -> PrefillRecording:
    """Prefill `input_ids` [1, L] through `model`, recording every layer (stats window: 32)."""
    _active.append(PrefillRecording())
    try:
        with attention_implementation(model, RECORDER, _record_attention), torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
        return _active[-1]
    finally:
        _active.pop()


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
