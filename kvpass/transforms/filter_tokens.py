"""`kvpass.FilterTokens`: online token filtering by joint key–value similarity, no calibration data.

A token whose key and value both resemble what a layer has already seen (the layer's running
anchors: moving averages of its keys and values) adds little there. In the filtered layers the
most redundant tokens skip attention as queries (the residual stream carries them) and, with
`drop_kv`, are never stored in that layer's cache: the cache receives the kept tokens with
`TokenPositions` that leave gaps where the filtered ones were, as for every pruning before
attention. The scoring and its fusion rule are in `kvpass.kernels.similarity`; the runtime part
in `kvpass.runtime.token_filter`.

Planning: the filter's saving is a target (each input keeps `1 - ratio` of its tokens in the
filtered layers), not a bound (decode steps track it with a moving threshold), and its anchors take
bytes of their own. It therefore runs with `kvpass.Evict` (whose attention runs the filter and
whose plan holds the byte cap): below budget 1 the filtered sites' eviction caps sit at
`1 - ratio` (eviction enforces at every step what filtering only targets), the anchors are
carved out of those caps, and the budget the filtered sites do not need goes to the other sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvpass.errors import UnsupportedModelError
from kvpass.kernels.similarity import FUSIONS
from kvpass.runtime.token_filter import FilterState
from kvpass.site import AttentionSite
from kvpass.transforms.base import Backend, Phase, PlanningContext, RewriteTarget, Transform, register
from kvpass.transforms.evict import refuse_ragged
from kvpass.validation import boolean, integer, real

FUSION_CHOICES = (*FUSIONS, "random")
TAIL = 0.5
"""`layers="tail"`: the deeper half of the attention sites."""


@dataclass(frozen=True)
class FilterTokens(Transform):
    """Filter the `ratio` most redundant tokens in the chosen layers: their attention is skipped and
    (`drop_kv`) their keys and values are not cached there.

    `layers`: "tail" (the deeper half of the attention sites), a fraction of depth (0.25: the
    deepest quarter), or a list of site indices (`AttentionSite.layer`). `warmup`: the first
    tokens are never filtered (nor Evict's sinks). `recent`: 0 (default) never caches a filtered
    decode token, so no query of the layer sees it; above 0, a filtered decode token is cached and
    leaves the layer's cache `recent` steps later, so the next tokens still read their immediate
    context (32 costs less continuation perplexity on SmolLM2: see the README), and a prefill's last
    `recent` tokens are not filtered. `fusion`: how key and value similarity to the
    anchors combine ('joint': variance-aware, see `kvpass.kernels.similarity`; 'key', 'value':
    ablations; 'random': a control at the same ratio, seeded by `seed`). `gamma`: the anchors'
    moving-average factor. `decode_step`: how far each decode decision moves the threshold towards
    the `ratio` quantile of the decode scores, in standard deviations of the prefill's scores (0.2,
    chosen on dev text; 0 freezes it at the prefill's quantile, which on real text over-filters the
    deeper layers). `ratio=0` changes nothing. `kvpass.stats(model)["FilterTokens"]`
    reports the achieved fraction per layer.

    Needs `kvpass.Evict` in the same transforms (at budget 1 it evicts nothing) and a transformers
    model whose attention runs through transformers' attention interface.

    Example:
        >>> import kvpass
        >>> kvpass.FilterTokens(0.5).phase.name
        'SELECTION'
        >>> model = kvpass.optimize(model, budget=1.0, transforms=[kvpass.FilterTokens(0.5), kvpass.Evict()])  # doctest: +SKIP
        >>> model = kvpass.optimize(model, budget=0.4, transforms=[kvpass.FilterTokens(0.5), kvpass.Evict()])  # doctest: +SKIP
    """

    name = "FilterTokens"
    phase = Phase.SELECTION
    ratio: float
    layers: Any = "tail"
    warmup: int = 16
    recent: int = 0
    fusion: str = "joint"
    gamma: float = 0.9
    drop_kv: bool = True
    seed: int = 0
    decode_step: float = 0.2

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_CHOICES:
            raise ValueError(f"FilterTokens: fusion must be one of {FUSION_CHOICES}, got {self.fusion!r}")
        normalized = {
            "ratio": real(self.ratio, "FilterTokens: ratio", 0.0, 1.0, high_open=True,
                          meaning="the share of tokens filtered in the chosen layers"),
            "layers": _layer_spec(self.layers),
            "warmup": integer(self.warmup, "FilterTokens: warmup", minimum=0, meaning="first tokens never filtered"),
            "recent": integer(self.recent, "FilterTokens: recent", minimum=0,
                              meaning="decode steps a filtered token stays cached"),
            "gamma": real(self.gamma, "FilterTokens: gamma", 0.0, 1.0, low_open=True, high_open=True,
                          meaning="the anchors' moving-average factor"),
            "drop_kv": boolean(self.drop_kv, "FilterTokens: drop_kv"),
            "seed": integer(self.seed, "FilterTokens: seed"),
            "decode_step": real(self.decode_step, "FilterTokens: decode_step", 0.0, math.inf,
                                meaning="the decode threshold's step in standard deviations of the prefill's scores"),
        }
        for key, value in normalized.items():
            object.__setattr__(self, key, value)

    def options(self) -> dict[str, Any]:
        options = super().options()
        options["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        return options

    def filtered_sites(self, sites: list[AttentionSite]) -> list[AttentionSite]:
        """The sites `layers` chooses among `sites`; a clear error when it names ones the model lacks."""
        count = len(sites)
        if isinstance(self.layers, tuple):
            known = {site.layer for site in sites}
            missing = sorted(set(self.layers) - known)
            if missing:
                raise ValueError(f"FilterTokens: layers {missing} are not attention sites of this model; its sites "
                                 f"are layers 0..{count - 1}")
            return [site for site in sites if site.layer in self.layers]
        share = TAIL if self.layers == "tail" else self.layers
        deepest = sorted(sites, key=lambda site: site.layer)[count - math.ceil(share * count):]
        return [site for site in sites if site in deepest]

    def decide(self, context: PlanningContext) -> None:
        sites = self.filtered_sites(list(context.sites))
        if self.ratio == 0:
            return
        windowed = [site.layer for site in context.sites if site.window is not None]
        if windowed:
            raise UnsupportedModelError(
                f"FilterTokens: layers {windowed} are sliding-window or chunked; token filtering does not support "
                "such models yet (their windowed sites share the byte cap with the others, which leaves the "
                "anchors' bytes unaccounted), so the model is left unchanged")
        for site in sites:
            kv_heads = site.num_kv_heads - len(context.pruned_heads.get(site.name, ()))
            context.reserved_bytes[site.name] = context.reserved_bytes.get(site.name, 0) + \
                FilterState.bytes_per_sequence(kv_heads, site.head_dim, self.fusion != "random", self.recent)
            if self.drop_kv:
                context.kept_fraction[site.name] = min(context.kept_fraction.get(site.name, 1.0), 1.0 - self.ratio)

    def stats(self, plan, cache) -> dict[str, Any]:
        layers = {}
        for layer in getattr(cache, "layers", []):
            state = getattr(getattr(layer, "site_cache", None), "state", {}).get(self.name)
            if state is not None:
                layers[layer.site.name] = {"fraction": state.filtered / max(state.tokens, 1),
                                           "filtered": state.filtered, "tokens": state.tokens, "active": state.active}
        filtered, tokens = sum(f["filtered"] for f in layers.values()), sum(f["tokens"] for f in layers.values())
        return {"ratio": self.ratio, "fusion": self.fusion, "fraction": filtered / max(tokens, 1), "layers": layers}


def _layer_spec(layers: Any) -> str | float | tuple[int, ...]:
    """`layers` validated: 'tail', a fraction of depth in (0, 1], or a tuple of site indices."""
    if layers == "tail":
        return layers
    if isinstance(layers, float) and 0.0 < layers <= 1.0:
        return layers
    if isinstance(layers, (list, tuple)) and layers and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        return tuple(sorted(set(layers)))
    raise ValueError(f"FilterTokens: layers must be 'tail', a fraction of depth in (0, 1] (0.25: the deepest "
                     f"quarter) or a non-empty list of layer indices >= 0, got {layers!r}")


@register(FilterTokens, Backend.HF)
def _filter_tokens_hf(transform: FilterTokens, target: RewriteTarget) -> None:
    """Hand every chosen site's attention its token filter (a pre-hook adds it to the call, while
    the plan it was made for is the model's)."""
    if transform.ratio == 0:
        return
    from kvpass.runtime.hf import FILTER_KEYWORD
    from kvpass.runtime.token_filter import TokenFilter

    plan = target.plan
    if plan.method is None:
        raise UnsupportedModelError("FilterTokens needs kvpass.Evict in the same transforms: its attention runs the "
                                    "filter and its plan holds the byte cap (at budget 1 it evicts nothing)")
    refuse_ragged(plan, "token filtering (its kept tokens have gaps in their positions)")
    in_force = lambda: getattr(target.model, "kvpass_plan", None) is plan  # noqa: E731
    for site in transform.filtered_sites(list(target.sites)):
        token_filter = TokenFilter(transform.name, site.layer, transform.ratio, transform.fusion, transform.gamma,
                                   max(transform.warmup, plan.sinks), transform.recent, transform.drop_kv,
                                   transform.seed, transform.decode_step)

        def hand_filter(module, args, kwargs, token_filter=token_filter):
            return (args, {**kwargs, FILTER_KEYWORD: token_filter}) if in_force() else None

        module = target.model.get_submodule(site.name)
        handle = module.register_forward_pre_hook(hand_filter, with_kwargs=True, prepend=True)  # before kvpass's own
        target.undo.append(handle.remove)
