"""Prefill token selection that propagates, inside a transformers decoder-only model.

During a prefill (the first call on an empty cache), layers from `first_scored` on report
SnapKV-style scores through the kvpass attention function (`kvpass_observer`). Once the rule
picks a layer L (a fixed layer, or ASL's rank-variance test, at `max_layer` at the latest), the decoder layers after L
receive only the selected tokens' hidden states, with their own rows and columns of the
attention mask, their own rotary embeddings and position ids; their attention runs on those
tokens only and their caches hold only those (`kvpass_positions` gives the compacted cache
a `TokenPositions` with their places in the prompt, so decoding continues at its full length). Two-pass
selection (GemFilter) stops the first pass at L, clears the cache, and runs every layer
again on the selected tokens.

Everything rides on hooks: a pre-hook and a hook on the decoder (the model's `model`), and a
pre-hook and a hook on each decoder layer. A call's state lives on its cache object
(`SELECTION_ATTRIBUTE`), so concurrent generations never share it. Batch rows select
together, at the deepest row's layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from kvpass.errors import UnsupportedModelError
from kvpass.runtime.call_arguments import MODEL_CACHE_KEYWORDS, cache_keyword, given_cache
from kvpass.runtime.compacted_cache import TokenPositions
from kvpass.runtime.hf import POSITIONS_KEYWORD
from kvpass.runtime.layer_selection import rank_variance_ratio, selected_tokens, window_scores

SELECTION_ATTRIBUTE = "_kvpass_selection"
"""Where a cache keeps the `SelectionState` of the prefill that filled it."""
LAYER_KEYWORDS = ("attention_mask", "position_ids", "position_embeddings")
"""What a decoder layer must take as keywords, by name or as **kwargs (with its cache, under either of
`MODEL_CACHE_KEYWORDS`), for its inputs to be narrowed to the selected tokens."""


@dataclass(frozen=True)
class SelectionRule:
    """Where and how many tokens one model selects (resolved from `kvpass.SelectLayer` for its depth)."""

    layers: int
    first_scored: int
    """The first layer whose scores are computed (min_layer, or the fixed layer)."""
    window: int
    kernel: int
    two_pass: bool
    fixed: int | None = None
    tau: float | None = None
    observe: int = 1
    keep: int | None = None
    """Tokens propagated (selected + window); None: `budget_keep(length)`."""
    budget_keep: Callable[[int], int] | None = None
    max_layer: int | None = None
    """ASL: where a ranking still unsettled selects anyway (None: the last layer a selection can be made at)."""

    def keep_for(self, length: int) -> int:
        keep = self.keep if self.keep is not None else self.budget_keep(length)
        return max(keep, self.window + 1)

    @property
    def deepest(self) -> int:
        """The deepest layer this rule selects at: the fixed layer, ASL's `max_layer`, or else the last layer
        a selection can be made at (the last layer for two passes, else the one before)."""
        if self.fixed is not None:
            return self.fixed
        if self.max_layer is not None:
            return self.max_layer
        return self.layers - 1 if self.two_pass else self.layers - 2


@dataclass
class SelectionState:
    """One prefill's selection: the scores seen so far, and what was selected where."""

    length: int
    keep: int
    active: bool
    layer: int | None = None
    """The layer the batch selected at (None: none did)."""
    row_layers: list[int | None] = field(default_factory=list)
    """The first layer at which each batch row's ranking was stable, or `max_layer` for a row whose ranking never
    settled (the fixed layer for every row)."""
    row_settled: list[bool] = field(default_factory=list)
    """ASL: whether each row's ranking passed the test (False: it selected at `max_layer` unsettled)."""
    propagate_from: int | None = None
    """The first layer that receives only the selected tokens."""
    indices: torch.Tensor | None = None
    """int64 [B, keep]: the selected tokens, in sequence order."""
    first_pass: bool = False
    history: list[torch.Tensor] = field(default_factory=list)
    observed: int | None = None
    """The layer whose scores arrived last (checked: a layer that was asked must report)."""
    narrowed: dict[str, Any] = field(default_factory=dict)
    """The decoder layers' keyword inputs narrowed to the selected tokens (computed once)."""

    def figures(self) -> dict[str, Any]:
        return {"layer": self.layer, "row_layers": list(self.row_layers), "row_settled": list(self.row_settled),
                "prompt_tokens": self.length,
                "tokens_kept": self.keep if self.layer is not None else self.length}


class _FirstPassDone(Exception):
    """Ends a two-pass selection's first pass at its selection layer."""


def decoder_layers(model: torch.nn.Module, sites: int) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The decoder module of a transformers causal LM and its layers; a clear error naming what is missing."""
    what = type(model).__name__
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UnsupportedModelError(f"SelectLayer: {what} has no decoder `model.layers` list (Llama-family layout), "
                                    "so deeper layers cannot be given the selected tokens only")
    if len(layers) != sites:
        raise UnsupportedModelError(f"SelectLayer: {what} has {len(layers)} decoder layers but {sites} attention "
                                    "sites; one self-attention per decoder layer is needed")
    for index, layer in enumerate(layers):
        parameters = inspect.signature(layer.forward).parameters
        # a layer taking **kwargs takes them all; the prefill checks the rest (a scored layer must report)
        takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
        missing = [] if takes_any else [name for name in LAYER_KEYWORDS if name not in parameters]
        if not takes_any and not any(name in parameters for name in MODEL_CACHE_KEYWORDS):
            missing.append(" or ".join(MODEL_CACHE_KEYWORDS))
        if missing:
            raise UnsupportedModelError(f"SelectLayer: decoder layer {index} ({type(layer).__name__}) takes no "
                                        f"{missing}: kvpass narrows those inputs to the selected tokens")
        if getattr(getattr(layer, "self_attn", None), "layer_idx", None) != index:
            raise UnsupportedModelError(f"SelectLayer: decoder layer {index} has no self_attn with layer_idx={index}")
    return decoder, layers


def install(model: torch.nn.Module, rule: SelectionRule, sites: int, plan: Any) -> Callable[[], None]:
    """Hook token selection into `model`'s prefills while `plan` is the model's plan; returns the undo.

    Re-optimizing the model with another plan leaves these hooks inert (selection or not, the
    new plan decides), and a failed re-optimization leaves them working."""
    decoder, layers = decoder_layers(model, sites)
    in_force = lambda: getattr(model, "kvpass_plan", None) is plan  # noqa: E731
    handles = [decoder.register_forward_pre_hook(_prefill_starts(rule, in_force), with_kwargs=True),
               decoder.register_forward_hook(_prefill_ends, with_kwargs=True)]
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(_layer_inputs(rule, index), with_kwargs=True))
        handles.append(layer.register_forward_hook(_layer_done(rule, index), with_kwargs=True))

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return undo


def _state(kwargs: dict) -> SelectionState | None:
    state = getattr(given_cache(kwargs), SELECTION_ATTRIBUTE, None)
    return state if state is not None and state.active else None


def _prefill_starts(rule: SelectionRule, in_force: Callable[[], bool]) -> Callable:
    def hook(module, args, kwargs):
        if not in_force():
            return None
        cache = given_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if cache is None and (use_cache if use_cache is not None else module.config.use_cache):
            cache = DynamicCache(config=module.config)  # the one the decoder would make: selection needs it
            kwargs = {**kwargs, cache_keyword(module, kwargs): cache}
        if cache is None or not hasattr(cache, "layers") or cache.get_seq_length() != 0:
            return None
        current = getattr(cache, SELECTION_ATTRIBUTE, None)
        if current is not None and current.first_pass:
            return None  # the first pass of a two-pass selection is running
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        length = inputs.shape[1]
        keep = rule.keep_for(length)
        state = SelectionState(length=length, keep=keep, active=length > keep)
        setattr(cache, SELECTION_ATTRIBUTE, state)
        if state.active and rule.two_pass:
            state.first_pass = True
            try:
                module(*args, **kwargs)
            except _FirstPassDone:
                pass
            finally:
                state.first_pass = False
            for index in range(len(cache.layers)):
                cache.layers[index] = DynamicLayer()
            state.history.clear()
            if state.layer is not None:
                state.propagate_from = 0
        return args, kwargs

    return hook


def _prefill_ends(module, args, kwargs, output) -> None:
    state = _state(kwargs)
    if state is not None and not state.first_pass:
        state.active = False


def _layer_inputs(rule: SelectionRule, index: int) -> Callable:
    """Decoder layer pre-hook: ask for scores while the layer is still to be chosen; narrow the inputs after it."""

    def hook(module, args, kwargs):
        state = _state(kwargs)
        if state is None:
            return None
        if state.propagate_from is not None and index >= state.propagate_from:
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == state.length:
                hidden = _gather(hidden, state.indices)
            if not state.narrowed:
                state.narrowed = _narrow_inputs(kwargs, state.indices, state.length)
            kwargs = {**kwargs, **state.narrowed}
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        if state.layer is None and rule.first_scored <= index <= rule.deepest:
            def observe(query, keys, mask, scale):
                state.history.append(window_scores(query, keys, mask, scale, rule.window, rule.kernel))
                state.observed = index

            return args, {**kwargs, "kvpass_observer": observe}
        return None

    return hook


def _layer_done(rule: SelectionRule, index: int) -> Callable:
    """Decoder layer hook: decide whether this layer is the selection layer."""

    def hook(module, args, kwargs, output):
        state = _state(kwargs)
        if state is None or state.layer is not None or not rule.first_scored <= index <= rule.deepest:
            return None
        if state.observed != index:
            raise UnsupportedModelError(
                f"SelectLayer: decoder layer {index} ({type(module).__name__}) did not report attention scores. They "
                "travel as a keyword argument from the decoder layer to kvpass's attention function: either this "
                "layer does not pass its keyword arguments on to self_attn (so kvpass cannot select in this model), "
                "or its attention does not run through kvpass (optimize with kvpass.Evict in transforms)")
        state.history = state.history[-(rule.observe if rule.fixed is None else 1):]
        decide_layer(rule, state, index)
        if state.layer is None:
            return None
        state.propagate_from = index + 1
        if state.first_pass:
            raise _FirstPassDone
        return None

    return hook


def decide_layer(rule: SelectionRule, state: SelectionState, index: int) -> None:
    """Fixed: select at that layer. ASL: each row's first layer whose rank-variance ratio is under tau, or
    `rule.deepest` for a row still unsettled there (tau 0 never selects); the batch selects once every row
    has, with that layer's scores."""
    scores = state.history[-1]
    rows = scores.shape[0]
    if rule.fixed is not None:
        if index != rule.fixed:
            return
        state.row_layers = [index] * rows
    else:
        if not state.row_layers:
            state.row_layers, state.row_settled = [None] * rows, [False] * rows
        ratio = rank_variance_ratio(state.history, state.keep - rule.window)
        for row, value in enumerate(ratio.tolist()):
            if state.row_layers[row] is None and value < rule.tau:
                state.row_layers[row], state.row_settled[row] = index, True
        if index == rule.deepest and rule.tau > 0:
            state.row_layers = [index if layer is None else layer for layer in state.row_layers]
        if any(layer is None for layer in state.row_layers):
            return
    state.layer = index
    state.indices = selected_tokens(scores, state.length, state.keep)


def _gather(tensor: torch.Tensor, indices: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """`tensor`'s entries at `indices` [B, K] along `dim` (a batch-1 tensor is shared by every row)."""
    batch, kept = indices.shape
    view = [batch] + [1] * (tensor.dim() - 1)
    view[dim] = kept
    target = [batch, *tensor.shape[1:]]
    target[dim] = kept
    expanded = tensor.expand(batch, *tensor.shape[1:])
    return torch.gather(expanded, dim, indices.to(tensor.device).view(view).expand(target))


def _narrow_inputs(kwargs: dict, indices: torch.Tensor, length: int) -> dict[str, Any]:
    """A decoder layer's keyword inputs for the selected tokens only, and where they sit in the `length` prompt."""
    narrowed: dict[str, Any] = {}
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise UnsupportedModelError("SelectLayer: the decoder layers were not given position_ids, so the selected "
                                    "tokens' positions are unknown")
    narrowed["position_ids"] = _gather(position_ids, indices)
    embeddings = kwargs.get("position_embeddings")
    if embeddings is not None:
        narrowed["position_embeddings"] = tuple(_gather(part, indices) for part in embeddings)
    mask, padding = kwargs.get("attention_mask"), None
    if isinstance(mask, torch.Tensor):
        if mask.dim() != 4:
            raise UnsupportedModelError(f"SelectLayer: a {mask.dim()}-D attention mask reached the decoder layers; "
                                        "kvpass narrows 4-D masks [B, heads, queries, keys]")
        narrowed["attention_mask"] = _gather(_gather(mask, indices, dim=2), indices, dim=3)
        last_row = mask[:, 0, -1, :]  # the last query of a causal mask sees every real token
        padding = _gather(~(last_row if last_row.dtype == torch.bool else last_row == 0), indices)
    elif mask is not None:
        raise UnsupportedModelError(f"SelectLayer: the decoder layers were given a {type(mask).__name__} attention "
                                    "mask; kvpass narrows 4-D tensor masks")
    narrowed[POSITIONS_KEYWORD] = TokenPositions(indices, span=length, padding=padding)
    return narrowed
