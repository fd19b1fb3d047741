"""`kvpass.PrunePatches`: drop redundant image tokens of a vision-language model before (or inside) its language model.

Most of a VLM's prompt is image tokens (576 to thousands per image), many of them redundant
(sky, walls, blank paper). Dropping them shrinks the language model's sequence, its prefill
compute and its KV cache at once. Three ways to choose what stays (one image at a time):

* `"similarity"` (V-PRUNE-style): groups near-duplicate tokens by the raw pixels of their image
  region (`source="pixels"`) or by their vision features (`"features"`) and keeps one per group;
  `merge=True` gives it the group's mean features. `keep` is an upper bound: a flat image keeps one.
* `"dominant"` (VisionZip): keeps the tokens whose patches the vision encoder's [CLS] token (or,
  without one, all its tokens) attends to most at its last layer before the features; a
  `contextual` share of the kept tokens are the others merged by key similarity.
* `"fastv"` (FastV): after decoder layer `layer` - 1 of the language model, keeps the image
  tokens the last token attends to most; layers before it see every token.

Kept tokens keep their positions in the sequence (the (t, h, w) M-RoPE ids where the model uses
them): the language model's cache holds fewer tokens and knows where each one sits. The
boundary is found in the model's graph (`VisionBoundary`); a model without one is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from kvpass.errors import UnsupportedModelError
from kvpass.transforms.base import Backend, Phase, PlanningContext, RewriteTarget, Transform, register

METHODS = ("similarity", "dominant", "fastv")
SOURCES = ("pixels", "features")
METHOD_OPTIONS = {"source": "similarity", "threshold": "similarity", "merge": "similarity", "contextual": "dominant",
                  "layer": "fastv"}
"""Options that apply to one method only."""


@dataclass(frozen=True)
class PrunePatches(Transform):
    """Keep `keep` of each sequence's image tokens: a fraction in (0, 1] (`ceil(keep x image tokens)`)
    or a count >= 1 (1 keeps one token; 1.0 keeps all), spread over its images by size. Exact for
    'dominant' and 'fastv', an upper bound for 'similarity'.

    Options by method: 'similarity': `source` ('pixels' or 'features'), `threshold` (tokens closer
    than threshold x the image's RMS norm are duplicates), `merge`; 'dominant': `contextual` (share
    of the kept tokens that are merged contextual tokens); 'fastv': `layer` (K >= 1: the first
    decoder layer that sees only the kept tokens).

    `kvpass.stats(model)["PrunePatches"]` reports the image tokens in and out and the sequence
    lengths. Combine with `kvpass.Evict()` to cap the cache below the unmodified model's bytes.

    Example:
        >>> import kvpass
        >>> kvpass.PrunePatches(0.25, method="fastv", layer=2).keep
        0.25
        >>> model = kvpass.optimize(model, budget=0.3, transforms=[kvpass.PrunePatches(0.5), kvpass.Evict()],
        ...                         example_inputs=processor(images=image, text=prompt, return_tensors="pt"))  # doctest: +SKIP
    """

    name = "PrunePatches"
    phase = Phase.SELECTION
    keep: float | int
    method: str = "similarity"
    source: str = "pixels"
    threshold: float = 0.1
    merge: bool = False
    contextual: float = 0.15
    layer: int = 2

    def __post_init__(self) -> None:
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or (
                isinstance(keep, float) and not (0.0 < keep <= 1.0)) or (isinstance(keep, int) and keep < 1) \
                or (isinstance(keep, float) and math.isnan(keep)):
            raise ValueError(f"PrunePatches: keep must be a fraction in (0, 1] or a count >= 1 of image tokens, "
                             f"got {keep!r}")
        if self.method not in METHODS:
            raise ValueError(f"PrunePatches: method must be one of {METHODS}, got {self.method!r}")
        if self.source not in SOURCES:
            raise ValueError(f"PrunePatches: source must be one of {SOURCES}, got {self.source!r}")
        defaults = {f.name: f.default for f in fields(self)}
        foreign = [name for name, method in METHOD_OPTIONS.items()
                   if method != self.method and getattr(self, name) != defaults[name]]
        if foreign:
            raise ValueError(f"PrunePatches: {foreign} do not apply to method={self.method!r} "
                             f"({', '.join(f'{n}: {METHOD_OPTIONS[n]}' for n in foreign)})")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ValueError(f"PrunePatches: threshold must be a number >= 0, got {self.threshold!r}")
        if not isinstance(self.merge, bool):
            raise ValueError(f"PrunePatches: merge must be True or False, got {self.merge!r}")
        if isinstance(self.contextual, bool) or not isinstance(self.contextual, (int, float)) \
                or not 0.0 <= self.contextual < 1.0:
            raise ValueError(f"PrunePatches: contextual must be a fraction in [0, 1) of the kept tokens, "
                             f"got {self.contextual!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"PrunePatches: layer must be an int >= 1 (FastV needs a layer before it to rank "
                             f"tokens), got {self.layer!r}")

    @property
    def keeps_everything(self) -> bool:
        return isinstance(self.keep, float) and self.keep == 1.0

    def decide(self, context: PlanningContext) -> None:
        boundary = context.sites.vision
        if boundary is None:
            raise UnsupportedModelError(
                "PrunePatches: the captured graph shows no place where vision features enter a language model "
                f"({context.sites.vision_note or 'no capture note'}); capture a vision-language model with an image: "
                "kvpass.optimize(model, ..., example_inputs=processor(images=..., text=..., return_tensors='pt'))")
        if self.method == "fastv" and self.layer >= len(context.sites):
            raise ValueError(f"PrunePatches: layer={self.layer} must be below the language model's "
                             f"{len(context.sites)} decoder layers")

    def stats(self, plan, cache) -> dict[str, Any]:
        from kvpass.runtime.patch_pruning import RECORD_ATTRIBUTE

        record = getattr(cache, RECORD_ATTRIBUTE, None)
        if record is None:
            return {"method": self.method, "image_tokens_in": 0, "image_tokens_out": 0,
                    "note": "no call through the vision-language boundary used this cache"}
        figures = {"method": self.method, "image_tokens_in": record.image_tokens_in,
                   "image_tokens_out": record.image_tokens_out, "sequence_length": record.sequence_length,
                   "lm_sequence_length": record.language_model_length,
                   "kept_image_positions": record.kept_image_positions}
        if not record.image_tokens_in:
            figures["note"] = "no image tokens in the input: nothing was pruned"
        return figures


@register(PrunePatches, Backend.HF)
def _prune_patches_hf(transform: PrunePatches, target: RewriteTarget) -> None:
    from kvpass.runtime.hf_eviction import bind_plan
    from kvpass.runtime.patch_pruning import PatchOptions, PatchPruning

    options = PatchOptions(**{f.name: getattr(transform, f.name) for f in fields(PatchOptions)})
    pruning = PatchPruning(target.model, target.sites.vision, options, [site.name for site in target.sites])
    target.undo.append(pruning.install())
    if target.plan.method is None and not transform.keeps_everything:
        # No Evict binds the language model onto kvpass's caches, which place the kept tokens at their positions.
        target.undo.append(bind_plan(target.model, target.sites, target.plan))
