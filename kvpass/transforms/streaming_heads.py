"""`kvpass.StreamingHeads`: chosen KV heads keep only attention sinks and a recent window (DuoAttention).

Retrieval heads read far back; for the others, sinks plus the latest tokens carry almost all
the attention. `fraction` of the KV heads the model keeps become streaming heads, physically:
their segment of the ragged cache holds `sinks + recent` tokens whatever the length, while the
retrieval heads keep their whole cache, or, with `kvpass.Evict`, the site's eviction budget
minus what the streaming heads hold (so at equal bytes they keep more than under `Evict` alone).
When the budget covers the retrieval heads whole, uniform allocation spreads it over the heads,
not the layers (`kvpass.planning.streaming_shares`): a layer of retrieval heads gets its whole
cache and a layer of streaming heads little more than their windows.

Heads are chosen before anything is touched, globally across layers, by calibration: each KV
head's relative error of the attention block's output when it alone streams, on prompts that
need long-range retrieval (`kvpass.streaming_calibration`). Planned in the SELECTION phase:
after structural transforms (a removed head cannot stream; the fraction counts the heads left)
and before eviction, which must see which heads stream to size the cache.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from kvpass.errors import UnsupportedModelError
from kvpass.planning import check_schedule_options
from kvpass.transforms.base import (
    Backend,
    Phase,
    PlanningContext,
    RewriteTarget,
    Transform,
    register,
)
from kvpass.transforms.evict import Evict
from kvpass.validation import integer, real

IMPORTANCE = ("output_error", "long_range", "random")


@dataclass(frozen=True)
class StreamingHeads(Transform):
    """Make `fraction` (floor) of the model's KV heads streaming heads keeping `sinks` + `recent` tokens.

    `importance`: 'output_error' (calibration on generated retrieval prompts, or the `calibration=`
    prompts given to `optimize`: the layer-output error when the head streams; the smallest
    errors stream), 'long_range' (the calibration's share of attention past sinks and the
    recent window: the least long-range heads stream), or 'random' (seeded; a control).
    Alone it needs `budget=1.0` (a short sequence keeps everything); with `kvpass.Evict` the
    budget holds at every length. `fraction=0` changes nothing.

    Example:
        >>> import kvpass
        >>> kvpass.StreamingHeads(1 / 3).recent
        64
        >>> model = kvpass.optimize(model, budget=1.0, transforms=[kvpass.StreamingHeads(0.5)])  # doctest: +SKIP
    """

    name = "StreamingHeads"
    phase = Phase.SELECTION
    fraction: float
    sinks: int = 4
    recent: int = 64
    importance: str = "output_error"
    seed: int = 0

    def __post_init__(self) -> None:
        """Check every option where it is given, naming it (numpy numbers count as numbers)."""
        checked = {"fraction": real(self.fraction, "StreamingHeads: fraction", 0.0, 1.0,
                                    meaning="the share of KV heads that stream"),
                   "seed": integer(self.seed, "StreamingHeads: seed")}
        try:
            checked["sinks"], checked["recent"], _ = check_schedule_options(self.sinks, self.recent, 1)
        except ValueError as error:
            raise ValueError(f"StreamingHeads: {error}") from None
        if self.importance not in IMPORTANCE:
            raise ValueError(f"StreamingHeads: importance must be one of {IMPORTANCE}, got {self.importance!r}")
        for key, value in checked.items():
            object.__setattr__(self, key, value)

    def decide(self, context: PlanningContext) -> None:
        kept = {site.name: [h for h in range(site.num_kv_heads) if h not in context.pruned_heads.get(site.name, ())]
                for site in context.sites}
        count = math.floor(self.fraction * sum(map(len, kept.values())))
        if count == 0:
            return
        scores = self._scores(context)
        ranked = sorted((scores[site.name][head], site.layer, head, site.name)
                        for site in context.sites for head in kept[site.name])
        streaming: dict[str, list[int]] = {}
        for _, _, head, name in ranked[:count]:
            streaming.setdefault(name, []).append(head)
        context.streaming_heads = {name: sorted(heads) for name, heads in streaming.items()}
        context.streaming_window = (self.sinks, self.recent)

    def _scores(self, context: PlanningContext) -> dict[str, list[float]]:
        """Site name -> how much each original KV head needs its whole cache (higher: kept a retrieval head)."""
        if self.importance == "random":
            generator = random.Random(self.seed)
            return {site.name: [generator.random() for _ in range(site.num_kv_heads)] for site in context.sites}
        if self.importance == "long_range":
            measured = context.calibration().long_range
            missing = [site.name for site in context.sites if site.name not in measured]
            if missing:
                raise UnsupportedModelError(f"StreamingHeads: calibration measured no long-range share for {missing}")
            return {site.name: measured[site.name] for site in context.sites}
        from kvpass.calibration import Calibration
        from kvpass.streaming_calibration import retrieval_prompts, streaming_errors

        source = context.calibration_source
        prompts = source if source is not None and not isinstance(source, Calibration) else None
        if isinstance(prompts, str) or hasattr(prompts, "dim"):
            prompts = [prompts]
        if prompts is None:
            prompts = retrieval_prompts(context.tokenizer, getattr(getattr(context.model, "config", None),
                                                                   "vocab_size", None))
        return streaming_errors(context.model, list(context.sites), prompts, sinks=self.sinks, recent=self.recent,
                                tokenizer=context.tokenizer)

    def stats(self, plan, cache) -> dict[str, Any]:
        streaming = sum(map(len, plan.streaming_heads.values()))
        kept = sum(plan.geometry(site).num_kv_heads for site in plan.sites)
        return {"streaming_heads": streaming, "kv_heads": kept, "heads": dict(plan.streaming_heads),
                "window": [plan.streaming_sinks, plan.streaming_recent]}


@register(StreamingHeads, Backend.HF)
def _streaming_heads_hf(transform: StreamingHeads, target: RewriteTarget) -> None:
    """Bind the plan's ragged caches, unless `kvpass.Evict` is in the transforms: its handler binds them."""
    from kvpass.runtime.hf_eviction import bind_plan

    if any(record["name"] == Evict.name for record in target.plan.transforms):
        return
    target.undo.append(bind_plan(target.model, target.sites, target.plan))


@register(StreamingHeads, Backend.ONNX)
def _streaming_heads_onnx(transform: StreamingHeads, target: RewriteTarget) -> None:
    """Rewrite the graph's sites onto packed caches (a plan made on the torch model, which chose the
    heads), unless `kvpass.Evict` is in the transforms: its handler rewrites them."""
    from kvpass.rewrites.onnx import rewrite_sites

    if any(record["name"] == Evict.name for record in target.plan.transforms):
        return
    rewrite_sites(target.model, target.sites, target.plan, target.plan.dtype_bytes)
