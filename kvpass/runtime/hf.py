"""Running rewritten sites inside Hugging Face models, so `model.generate` keeps working.

A transformers model owns its cache object (`DynamicCache`) and calls each attention
module as `cache.update(k, v, layer_idx)` followed by the function registered for
`config._attn_implementation`. kvpass plugs into exactly those two seams, for the modules
the graph matcher found:

* `KVPassCacheLayer` replaces the cache's per-layer storage with a `CompactedKV`
  (installed by a forward pre-hook on the attention module, so a cache created by
  `generate` or by the user is adopted on its first use); its `update` hands the new K/V
  on to the attention function rather than storing them;
* `kvpass_attention` is registered as the "kvpass" attention implementation: it appends the
  new K/V to the compacted cache (all of them, or what a token filter keeps), runs the
  `torch.ops.kvpass.attention` custom op over it, then evicts.

The pre-hook hands the call's cache layer to the attention function as a keyword argument
(transformers forwards an attention module's extra keywords to its attention function), so
per-call state travels with the call: two threads generating with one optimized model, each
with its own cache, never see each other's layers.

The cache reports the *logical* sequence length (tokens seen), so position ids, RoPE and
`cache_position` stay right after eviction, while the tensors it holds are smaller.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from kvpass import hf_attention
from kvpass.errors import UnsupportedModelError
from kvpass.methods import Method
from kvpass.planning import SiteSchedule
from kvpass.planning.head_schedule import HeadSchedule
from kvpass.runtime.compacted_cache import CompactedKV, TokenPositions
from kvpass.runtime.ragged_cache import new_site_cache
from kvpass.runtime.reallocation import ReallocationPolicy, Reallocator
from kvpass.site import AttentionSite

IMPLEMENTATION = "kvpass"


class KVPassCacheLayer(CacheLayerMixin):
    """A transformers cache layer whose storage is a `CompactedKV`."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, site_cache: CompactedKV, site: AttentionSite):
        super().__init__()
        self.site_cache = site_cache
        self.site = site
        """The site in the unmodified model (its full cache is what byte figures compare against)."""
        self.is_initialized = True
        self.is_sliding = site.window is not None
        self.hand_on = False
        """Set per call by the pre-hook: the call filters its tokens (`kvpass_filter`), so `update` hands the new
        K/V on to the attention, which appends what it keeps; otherwise `update` appends them at once and returns
        the whole cache, as transformers' own layers do (some models compute from it, e.g. Doge's dynamic mask)."""
        self.handed_on = 0
        """New tokens `update` handed on to the attention call."""

    @property
    def keys(self) -> torch.Tensor | None:
        """The uniform cache's keys [B, Hkv, T, D]; None for a ragged one (its heads differ in length)."""
        return getattr(self.site_cache, "keys", None)

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ assigns None
        pass

    @property
    def values(self) -> torch.Tensor | None:
        return getattr(self.site_cache, "values", None)

    @values.setter
    def values(self, value) -> None:
        pass

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new K/V and return the whole cache, or hand them on to a filtering call's attention."""
        if self.handed_on or self.site_cache.pending:
            raise UnsupportedModelError(
                f"{self.site.name} updated its cache again before kvpass's attention ran: the module computes "
                "attention itself rather than through transformers' attention interface")
        if not self.hand_on:
            return self.site_cache.extend(key_states, value_states)
        self.handed_on = key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        """Tokens seen, those handed on to the attention function included (as transformers' own layers count)."""
        return self.site_cache.seen + self.site_cache.pending + self.handed_on

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.site_cache = self.site_cache.empty()
        self.handed_on = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.site_cache.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.site_cache.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.site_cache.select_batch(torch.arange(self.site_cache.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedModelError(
            "kvpass caches cannot be cropped: assisted/speculative decoding rolls back tokens that may "
            "already have been evicted; generate without an assistant model"
        )


@dataclass
class SiteBinding:
    """What one rewritten attention module runs: its site, schedule and method."""

    site: AttentionSite
    """The site in the unmodified model."""
    method: Method
    schedule: SiteSchedule
    hooks: list = field(default_factory=list)
    reallocation: ReallocationPolicy | None = None
    """Set when the plan moves budget between sites while decoding; `index` is this site's place."""
    index: int = 0
    heads: HeadSchedule | None = None
    """The ragged arithmetic when the site's KV heads keep different numbers of tokens."""
    model_mask: bool = False
    """Apply the model's own attention mask at the kept slots (sliding windows, chunks, custom masks),
    rather than reading only padding off it and masking causally by slot (the fast path)."""
    calls: int = 0
    """Calls while the probe ran."""
    adopted: int = 0
    """Calls that found the model's cache and ran on a kvpass cache layer (the probe counts them)."""
    masks: list = field(default_factory=list)
    """The masks this site's attention was given while the probe ran (None otherwise)."""
    recording: bool = False


REALLOCATOR_ATTRIBUTE = "_kvpass_reallocator"
"""Where a model cache keeps the Reallocator its site caches share (one per generation)."""


BINDING_ATTRIBUTE = "_kvpass_binding"
"""Where a bound attention module keeps its SiteBinding: on the module, not in a global registry,
because torch.compile guards on what the lookup reads, and a global weak dict's keys shift
(IndexError while building guards) whenever some other optimized model is garbage-collected."""


LAYER_KEYWORD = "kvpass_layer"
"""The keyword the pre-hook adds to an attention module's call: that call's KVPassCacheLayer."""

POSITIONS_KEYWORD = "kvpass_positions"
"""The keyword the pre-hook adds when the call's tokens are not simply the next ones of the sequence
(patch pruning dropped some before they reached the attention): a `TokenPositions`."""

POSITIONS_ATTRIBUTE = "_kvpass_positions"
"""Where whoever drops tokens puts that `TokenPositions` on the call's cache, for the layers that see them."""

FILTER_KEYWORD = "kvpass_filter"
"""The keyword a transform's pre-hook adds when the site filters the call's tokens itself, after their keys
and values are known (`kvpass.runtime.token_filter.TokenFilter`)."""


class TokenFilter(Protocol):
    """Attention at a site that leaves some of the call's tokens out (`kvpass_filter`): returns the output
    [B, Hq, L, D] for every query, having appended to `cache` what it keeps and called `attend(query,
    positions=...)` with `TokenPositions` saying where those tokens sit. `positions`: the call's own (tokens
    pruned before the attention; None: the next L); `padding` [B, seen + L]: which tokens of the sequence so far
    are padding (the model's mask; None: none are)."""

    def __call__(self, cache: CompactedKV, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 positions: TokenPositions | None, padding: torch.Tensor | None,
                 attend: Callable[..., torch.Tensor]) -> torch.Tensor: ...


def kvpass_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     kvpass_layer: KVPassCacheLayer | None = None, kvpass_positions: TokenPositions | None = None,
                     softcap=None, s_aux=None, kvpass_observer=None, kvpass_filter: TokenFilter | None = None,
                     **kwargs):
    """The "kvpass" attention implementation: custom-op attention over the compacted cache.

    Besides scale and mask it honours what transformers passes to eager attention for Gemma 2's
    logit soft-capping (`softcap`) and GPT-OSS's sink logits (`s_aux`). `kvpass_observer(query,
    keys, mask, scale)`, when a call carries one (`kvpass.runtime.hf_selection` adds it), sees the
    queries and every cached key before attention. `kvpass_filter`, when a call carries one
    (`kvpass.FilterTokens` adds it), decides which of the new tokens the cache keeps and which
    queries attend."""
    binding = getattr(module, BINDING_ATTRIBUTE, None)
    if binding is None:
        raise UnsupportedModelError(
            f"attention module {type(module).__name__} routes to kvpass but was not rewritten by kvpass.optimize"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # With no mask, causality is the module's own flag, or the graph's verdict on the model's own masks (a module
    # flagged non-causal whose model masks it causally: its SDPA path drops the causality its eager path has)
    declared_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True) or binding.site.causal
    if kvpass_layer is None:  # use_cache=False: attention over this call's tokens, nothing is kept
        layer_cache = CompactedKV(replace(binding.schedule, fraction=1.0, window=None, shared=None), binding.method,
                                  binding.site.group_size)
    else:
        if kvpass_layer.hand_on and key.shape[-2] != kvpass_layer.handed_on:
            raise UnsupportedModelError(
                f"{binding.site.name}: {key.shape[-2]} new keys reached the attention, but the cache was updated with "
                f"{kvpass_layer.handed_on}: the module changes its keys between the cache and the attention")
        layer_cache = kvpass_layer.site_cache
        kvpass_layer.handed_on = 0
    stored = layer_cache.pending  # `update` appended the new tokens already (every call that does not filter)
    new_tokens = stored or key.shape[-2]
    if binding.recording:  # only the probe counts: a call never mutates the binding (torch.compile guards on it)
        binding.calls += 1
        binding.adopted += kvpass_layer is not None
        binding.masks.append(attention_mask)
    positions = kvpass_positions
    if positions is not None and positions.offsets.shape[-1] != new_tokens:
        raise RuntimeError(f"{binding.site.name}: the call's token positions cover {positions.offsets.shape[-1]} tokens, "
                           f"but {new_tokens} reached the attention")
    if kvpass_observer is not None:
        held = getattr(layer_cache, "keys", None)
        keys = held if stored else (key if held is None else torch.cat([held, key], dim=-2))
        kvpass_observer(query, keys, attention_mask, scale)
    options = {"softcap": float(softcap or 0.0), "sinks": s_aux}
    if binding.site.kv_tiled:  # the cache and its kernels read query heads grouped by KV head
        query = _tiled_to_grouped(query, binding.site.num_kv_heads)
        key, value = key[:, :binding.site.num_kv_heads], value[:, :binding.site.num_kv_heads]  # one whole copy
    if kvpass_filter is not None and stored:
        raise RuntimeError(f"{binding.site.name}: a filtering call found its new tokens already in the cache")
    if not stored and kvpass_filter is None:
        layer_cache.extend(key, value)
    if binding.model_mask:
        if positions is not None or kvpass_filter is not None:
            raise UnsupportedModelError(
                f"{binding.site.name} applies the model's own mask (a sliding window or a custom mask), which is "
                "over the unpruned sequence: kvpass cannot place tokens pruned before the attention in it")
        causal = declared_causal if attention_mask is None else False  # a given mask carries causality itself
        out = layer_cache.attend(query, scale, causal, model_mask=attention_mask, **options)
    else:
        # the probe checked this model's mask is causal + padding, whatever the module declares
        causal = declared_causal if attention_mask is None else True
        padding = _key_padding(attention_mask)
        attend = partial(layer_cache.attend, scale=scale, causal=causal, key_padding=padding, **options)
        if kvpass_filter is not None:
            out = kvpass_filter(layer_cache, query, key, value, positions, padding, attend)
        else:
            out = attend(query, positions=positions)
    if binding.site.kv_tiled:
        out = _tiled_to_grouped(out, out.shape[1] // binding.site.num_kv_heads)  # and back
    return out.transpose(1, 2).contiguous(), None


def _tiled_to_grouped(heads: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, g*Hkv, L, D] with head t*Hkv + j reading KV head j -> head j*g + t (the inverse is the same
    call with g and Hkv swapped)."""
    batch, count, length, dim = heads.shape
    return heads.view(batch, count // kv_heads, kv_heads, length, dim).transpose(1, 2).reshape(batch, count, length, dim)


def _key_padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, seen + new] True where a token of the sequence so far is padding, read off the model's own mask.

    The last query row of a causal mask sees every real token, so a column hidden from it is padding.
    """
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    last_row = attention_mask[:, 0, -1, :]
    visible = last_row if last_row.dtype == torch.bool else last_row == 0
    return ~visible


def find_cache(args: tuple, kwargs: dict) -> Any:
    """The cache an attention module was called with: a transformers `Cache` under any name or
    position (`past_key_values=`, `layer_past=`, ...), else whatever a cache keyword holds (the
    self-attention part of an encoder-decoder cache)."""
    found = next((value for value in (*kwargs.values(), *args) if isinstance(value, Cache)), None)
    if found is None:
        found = next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)
    return getattr(found, "self_attention_cache", found)  # an EncoderDecoderCache: its decoder self-attention part


CACHE_KEYWORDS = ("past_key_values", "past_key_value", "layer_past", "cache")
"""Keywords transformers attention modules take their cache under (checked when no `Cache` object is passed)."""


def _adopt_cache_layer(module, args, kwargs):
    """Forward pre-hook: make sure this layer of the model's cache is a kvpass layer, and hand it
    to this call's attention function."""
    binding = getattr(module, BINDING_ATTRIBUTE)
    cache = find_cache(args, kwargs)
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{type(cache).__name__} is not supported by kvpass at {binding.site.name}: a transformers Cache with "
            "layers (DynamicCache, the default of generate) or none; legacy tuple caches cannot be compacted in place"
        )
    index = module.layer_idx
    while len(layers) <= index:
        layers.append(DynamicLayer())
    layer = layers[index]
    if not isinstance(layer, KVPassCacheLayer):
        reallocator = None
        if binding.reallocation is not None:
            reallocator = getattr(cache, REALLOCATOR_ATTRIBUTE, None)
            if reallocator is None:
                reallocator = Reallocator(binding.reallocation)
                setattr(cache, REALLOCATOR_ATTRIBUTE, reallocator)
        layer = _convert_layer(layer, binding, reallocator)
        layers[index] = layer
    positions = getattr(cache, POSITIONS_ATTRIBUTE, None)
    layer.hand_on = FILTER_KEYWORD in kwargs  # the filter's pre-hook runs first (prepended)
    return args, {**kwargs, LAYER_KEYWORD: layer, **({POSITIONS_KEYWORD: positions} if positions is not None else {})}


def _convert_layer(layer: CacheLayerMixin, binding: SiteBinding, reallocator: Reallocator | None) -> KVPassCacheLayer:
    """A fresh or filled dynamic layer becomes a kvpass layer (a sliding-window one for a windowed
    site: the window stays in force, as the site's own bound); static and quantized layers are refused."""
    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) or (
            type(layer) is DynamicSlidingWindowLayer and binding.site.window is None):
        raise UnsupportedModelError(
            f"{type(layer).__name__} at {binding.site.name} is not supported: kvpass compacts dynamic caches only "
            "(static, quantized and offloaded caches are refused)"
        )
    cache = new_site_cache(binding.schedule, binding.heads, binding.method, binding.site.group_size, reallocator,
                           binding.index)
    if layer.is_initialized and layer.keys is not None and layer.keys.numel():
        cache.adopt(layer.keys, layer.values, getattr(layer, "cumulative_length", layer.keys.shape[-2]))
    return KVPassCacheLayer(cache, binding.site)


def bind(model: torch.nn.Module, modules: dict[str, torch.nn.Module], bindings: dict[str, SiteBinding]) -> None:
    """Route every bound module's attention through kvpass (reversible with `unbind`)."""
    hf_attention.register(IMPLEMENTATION, kvpass_attention)
    for name, binding in bindings.items():
        module = modules[name]
        if not hasattr(module, "layer_idx"):
            raise UnsupportedModelError(f"attention module {name} has no layer_idx: it cannot own a cache layer")
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(module.forward).parameters.values()):
            raise UnsupportedModelError(
                f"attention module {name} ({type(module).__name__}) takes no extra keywords, so it cannot hand its "
                "call's cache layer to transformers' attention interface (it computes attention itself)")
        setattr(module, BINDING_ATTRIBUTE, binding)
        binding.hooks.append(module.register_forward_pre_hook(_adopt_cache_layer, with_kwargs=True))


def unbind(modules: dict[str, torch.nn.Module], bindings: dict[str, SiteBinding]) -> None:
    """Undo `bind` for these modules."""
    for name, binding in bindings.items():
        for hook in binding.hooks:
            hook.remove()
        binding.hooks.clear()
        modules[name].__dict__.pop(BINDING_ATTRIBUTE, None)

