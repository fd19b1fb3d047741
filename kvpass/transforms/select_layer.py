"""`kvpass.SelectLayer`: prefill token selection that propagates (ASL, FastKV, GemFilter).

Eviction decides what a cache keeps after attention has seen every token. A selection layer
goes further: at a layer L during prefill the important tokens are picked (SnapKV scores:
attention from the last `window` queries, pooled, summed over heads) and only they, plus the
window, reach the layers after L, which compute on and cache those tokens only. Prefill gets
cheaper and the deeper caches smaller.

* `SelectLayer(layer=L)` selects at a fixed layer (FastKV);
* `SelectLayer(tau=0.3)` (ASL) selects at the first layer from `min_layer` whose token ranking
  is stable: the relative variance of the top tokens' ranks over the last `observe` layers is
  under `tau` (`kvpass.runtime.layer_selection.rank_variance_ratio`); a ranking still unsettled
  at `max_layer` selects there, which bounds the prefill's cost;
* `two_pass=True` (GemFilter; ASL_2pass with `tau`) stops at L and runs the whole model again
  on the selected tokens.

Selected tokens keep their positions (RoPE, and the cache's logical length), so decoding
continues after the full prompt. Every layer's cache stays under `kvpass.Evict`'s plan for the
global budget (the layers up to L evict as usual; the deeper ones hold `keep` tokens, which by
default is what the budget allows at the prompt's length), so the byte cap counts all layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvpass.errors import UnsupportedModelError
from kvpass.transforms.base import Backend, Phase, PlanningContext, RewriteTarget, Transform, register
from kvpass.validation import boolean, integer, real

DEFAULT_TAU = 0.3


@dataclass(frozen=True)
class SelectLayer(Transform):
    """Select the prefill tokens that deeper layers see, at a fixed `layer` or where the ranking is stable (`tau`).

    `tau` (default 0.3 when no `layer` is given): ASL's threshold on the relative rank variance;
    0 never selects (eviction alone), a value above 1 selects at `min_layer`. `max_layer` (default
    layers // 2, FastKV's half depth; chosen over 2 * layers // 3 on the suite's dev split): where a
    prompt whose ranking has not settled selects anyway, so ASL's prefill costs at most a selection
    there (the authors' rule has no such bound: a prompt that never settles is never pruned).
    `layer`: a fixed selection layer (not with `tau`). `keep`: tokens propagated, the window
    included (default: what the budget lets a layer hold at the prompt's length). `window`: observation queries
    (always kept). `observe` (default ceil(layers / 4)) and `min_layer` (default layers // 3):
    the ASL rule's layers. `kernel`: the scores' pooling width. `two_pass`: run the model again
    on the selected tokens (GemFilter; with `tau=0`, which never selects, the second pass is a
    second full prefill). Only a cached prefill (the first call on an empty cache, as in
    `generate`) selects. Needs `kvpass.Evict` in the same `transforms` (its plan
    bounds every layer's cache) and a transformers decoder-only model of the Llama layout.

    A prefill that selects returns logits for the kept tokens only (the last one is always
    kept, so `generate` is unaffected); `kvpass.stats(model)["SelectLayer"]` says where it
    selected. Batch rows select together, at the deepest row's layer.

    Example:
        >>> import kvpass
        >>> kvpass.SelectLayer(layer=4).tau is None
        True
        >>> model = kvpass.optimize(model, budget="256 tokens", transforms=[kvpass.SelectLayer(tau=0.3), kvpass.Evict("snapkv")])  # doctest: +SKIP
    """

    name = "SelectLayer"
    phase = Phase.SELECTION
    tau: float | None = None
    layer: int | None = None
    keep: int | None = None
    window: int = 32
    observe: int | None = None
    min_layer: int | None = None
    max_layer: int | None = None
    kernel: int = 7
    two_pass: bool = False

    def __post_init__(self) -> None:
        if self.layer is not None and self.tau is not None:
            raise ValueError("SelectLayer: give tau (adaptive layer) or layer (fixed layer), not both")
        fixed = self.layer is not None
        if fixed and (self.observe is not None or self.min_layer is not None or self.max_layer is not None):
            raise ValueError("SelectLayer: observe, min_layer and max_layer belong to the adaptive rule (tau); "
                             "a fixed layer uses none of them")
        window = integer(self.window, "SelectLayer: window", minimum=1, meaning="observation queries")
        normalized = {
            "tau": None if fixed else real(DEFAULT_TAU if self.tau is None else self.tau, "SelectLayer: tau", 0.0,
                                           math.inf, meaning="threshold on the relative rank variance"),
            "layer": None if not fixed else integer(self.layer, "SelectLayer: layer", minimum=0),
            "keep": None if self.keep is None else integer(self.keep, "SelectLayer: keep", minimum=window + 1,
                                                           meaning="tokens propagated, the window included"),
            "window": window,
            "observe": None if self.observe is None else integer(self.observe, "SelectLayer: observe", minimum=1,
                                                                 meaning="layers the rank variance spans"),
            "min_layer": None if self.min_layer is None else integer(self.min_layer, "SelectLayer: min_layer",
                                                                     minimum=0),
            "max_layer": None if self.max_layer is None else integer(self.max_layer, "SelectLayer: max_layer",
                                                                     minimum=0),
            "kernel": integer(self.kernel, "SelectLayer: kernel", minimum=1, meaning="pooling width"),
            "two_pass": boolean(self.two_pass, "SelectLayer: two_pass"),
        }
        if normalized["kernel"] % 2 == 0:
            raise ValueError(f"SelectLayer: kernel must be odd (pooling keeps the token count), got {self.kernel}")
        for key, value in normalized.items():
            object.__setattr__(self, key, value)

    def rule(self, layers: int, budget_keep=None):
        """The selection rule for a model of `layers` decoder layers; ValueError if a layer option is out of range."""
        from kvpass.runtime.hf_selection import SelectionRule

        last = layers - 1 if self.two_pass else layers - 2
        if self.layer is not None:
            if self.layer > last:
                raise ValueError(f"SelectLayer: layer={self.layer} must be at most {last} for a {layers}-layer model"
                                 + ("" if self.two_pass else " (a layer after it must receive the selection)"))
            return SelectionRule(layers, self.layer, self.window, self.kernel, self.two_pass, fixed=self.layer,
                                 keep=self.keep, budget_keep=budget_keep)
        min_layer = layers // 3 if self.min_layer is None else self.min_layer
        if min_layer > last:
            raise ValueError(f"SelectLayer: min_layer={min_layer} must be at most {last} for a {layers}-layer model")
        max_layer = min(max(layers // 2, min_layer), last) if self.max_layer is None else self.max_layer
        if not min_layer <= max_layer <= last:
            raise ValueError(f"SelectLayer: max_layer={max_layer} must lie within min_layer={min_layer}..{last} "
                             f"for a {layers}-layer model")
        observe = math.ceil(layers / 4) if self.observe is None else self.observe
        return SelectionRule(layers, min_layer, self.window, self.kernel, self.two_pass, tau=self.tau,
                             observe=observe, keep=self.keep, budget_keep=budget_keep, max_layer=max_layer)

    def decide(self, context: PlanningContext) -> None:
        sites = list(context.sites)
        self.rule(len(sites))
        windowed = [site.name for site in sites if site.window is not None]
        if windowed:
            raise UnsupportedModelError(f"SelectLayer: sites {windowed} attend within a sliding window or chunks; "
                                        "token selection supports full causal attention only")

    def stats(self, plan, cache) -> dict[str, Any]:
        from kvpass.runtime.hf_selection import SELECTION_ATTRIBUTE

        state = getattr(cache, SELECTION_ATTRIBUTE, None)
        return {"layer": None, "row_layers": [], "row_settled": [], "prompt_tokens": 0, "tokens_kept": 0} \
            if state is None \
            else state.figures()


@register(SelectLayer, Backend.HF)
def _select_layer_hf(transform: SelectLayer, target: RewriteTarget) -> None:
    from kvpass.runtime.hf_selection import install

    plan = target.plan
    if plan.method is None:
        raise UnsupportedModelError("SelectLayer needs kvpass.Evict in the same transforms: its plan bounds every "
                                    "layer's cache, and its attention reports the selection scores")
    dtype_bytes = next(target.model.parameters()).element_size()
    schedules = [plan.schedule(site, dtype_bytes) for site in target.sites]
    rule = transform.rule(len(schedules), lambda length: min(schedule.cap(length) for schedule in schedules))
    target.undo.append(install(target.model, rule, len(schedules), plan))
