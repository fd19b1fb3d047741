"""Transforms: every kind of pruning as a config object, planned jointly and applied by backend handlers.

    kvpass.optimize(model, budget=0.5, transforms=[kvpass.PruneHeads(0.25), kvpass.Evict("tova")])

A new kind of pruning is a `Transform` subclass plus `@register(...)` handlers, in its own
files (see `kvpass.transforms.base`); `kvpass.transforms.prune_heads.remove_planned_heads` is the
handler any transform that plans `pruned_heads` can reuse.
"""

from kvpass.transforms.base import (HANDLERS, TRANSFORMS, Backend, Phase, PlanningContext, RewriteTarget, Transform,
                                    from_record, register)
from kvpass.transforms.evict import Evict
from kvpass.transforms.filter_tokens import FilterTokens
from kvpass.transforms.prune_heads import PruneHeads, remove_planned_heads
from kvpass.transforms.prune_patches import PrunePatches
from kvpass.transforms.select_layer import SelectLayer
from kvpass.transforms.streaming_heads import StreamingHeads

__all__ = ["Transform", "Evict", "FilterTokens", "PruneHeads", "PrunePatches", "SelectLayer", "StreamingHeads",
           "Backend", "Phase", "PlanningContext", "RewriteTarget", "register", "from_record", "remove_planned_heads",
           "HANDLERS", "TRANSFORMS"]
