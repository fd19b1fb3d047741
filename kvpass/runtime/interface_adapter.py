"""Attention modules that compute attention themselves, made to dispatch through transformers' attention interface.

Most transformers attention modules call `cache.update(k, v)` and then the function registered for the
config's attention implementation; kvpass works through that seam (its runtime, calibration, the test
oracle). Some modules (BLOOM, Falcon, GPT-J, CodeGen, XGLM, BERT-style decoders, ...) compute
softmax(q·kᵀ + bias)·v with their own ops instead. `adapt_self_computing` gives each such module an
`InterfaceAdapter` as its forward:

* under the model's own implementations (eager, sdpa, ...) it runs the module's own forward, unchanged;
* under an implementation kvpass registered (`kvpass.hf_attention.register`), it runs the module's
  forward traced and rewritten (`kvpass.rewrites.module_attention`): the cache update and the
  attention become one call that updates the call's cache and runs the registered function with the
  module's query, keys, values and logit bias (its mask, ALiBi, ... over logical positions) as the
  attention mask.

A trace is captured per call signature (`kvpass.capture`, torch.export with free sizes) with the cache's
past K/V as graph inputs, and runs given them as meta tensors of the cache's *logical* length: the module's
shape arithmetic sees the sequence it expects, while the cache holds only what it keeps. The adapted
model's configs are marked so that kvpass's implementations build eager (additive) masks, which the modules'
own code adds to its logits (`kvpass.hf_attention.use_eager_masks`).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache

from kvpass import hf_attention
from kvpass.capture import capture
from kvpass.errors import KVPassError, UnsupportedModelError
from kvpass.rewrites.fx import find_sites
from kvpass.rewrites.module_attention import rewrite_module_attention
from kvpass.runtime.hf import CACHE_KEYWORDS, find_cache
from kvpass.site import AttentionSite

MAX_TRACES = 16
"""Traces one module keeps (one per call signature: prefill, decode, no cache, ...; and per range of sizes its
code branches on, which torch.export guards) before refusing."""

KVPASS_KEYWORDS = "kvpass_"
"""Keywords kvpass's hooks add to an attention module's call, for the attention function (never the module)."""


@dataclass
class _Call:
    """What the rewritten graph's attention call needs from the module call it runs for."""

    module: torch.nn.Module
    cache: Cache | None
    function: Any
    keywords: dict[str, Any]


_CURRENT_CALL: ContextVar[_Call] = ContextVar("kvpass_interface_adapter_call")
"""The call a rewritten graph is running for (each thread and nested call sees its own)."""


class InterfaceAdapter:
    """A module's `forward` that dispatches its self-computed attention through transformers' interface.

    Example:
        >>> adapter = InterfaceAdapter(module, site, model.config)   # doctest: +SKIP
        >>> adapter.install()  # module(...) now reaches the interface  # doctest: +SKIP
    """

    def __init__(self, module: torch.nn.Module, site: AttentionSite, config: Any):
        self.module, self.site = module, site
        self.config = getattr(module, "config", config)
        self.graphs: dict[tuple, list[torch.fx.GraphModule]] = {}
        self.kv_shape: tuple[int, int, int] | None = None
        """(KV heads, key dim, value dim) the module hands its cache, learned from its first call (they differ
        from the site's once heads are pruned)."""
        self.weights: tuple = ()
        """Shapes, dtypes and devices of the module's parameters when it was traced."""

    def install(self) -> None:
        self.module.forward = self

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        own = type(self.module).forward.__get__(self.module)
        keywords = {name: kwargs.pop(name) for name in list(kwargs) if name.startswith(KVPASS_KEYWORDS)}
        implementation = self.config._attn_implementation
        if implementation not in hf_attention.REGISTERED:
            return own(*args, **kwargs)
        return self._run_traced(own, AttentionInterface._global_mapping[implementation], args, kwargs, keywords)

    @torch.compiler.disable
    def _run_traced(self, own, function, args: tuple, kwargs: dict, keywords: dict) -> Any:
        """The module's call through its traced rewrite (kept out of `torch.compile`: a compiled model runs it
        eagerly, between its compiled parts)."""
        cache = find_cache(args, kwargs)
        if cache is None:  # traced as a call on an empty cache that is then dropped (never a different code path)
            keyword = next((name for name in CACHE_KEYWORDS if name in kwargs and kwargs[name] is None), None)
            if keyword is None:
                return own(*args, **kwargs)
            kwargs[keyword] = DynamicCache()
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs), is_leaf=lambda value: isinstance(value, Cache))
        tensors = tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
        seen = self._seen(cache)
        weights = tuple((tuple(p.shape), p.dtype, p.device) for p in self.module.parameters())
        if weights != self.weights:  # heads pruned, or a cast or move: the traces' sizes and constants are stale
            self.graphs, self.kv_shape, self.weights = {}, None, weights
        if self.kv_shape is None:
            self.kv_shape = _kv_shape(own, leaves, spec, seen)
        heads, key_dim, value_dim = self.kv_shape
        parameter = next(self.module.parameters())
        past_keys, past_values = (torch.empty(tensors[0].shape[0], heads, seen, dim, dtype=parameter.dtype,
                                              device="meta") for dim in (key_dim, value_dim))
        key = _signature(leaves, past_keys)
        token = _CURRENT_CALL.set(_Call(self.module, cache, function, keywords))
        try:  # the past as the module would read it, [B, Hkv, seen, D], on the meta device: sizes, no data
            for graph in self.graphs.get(key, []):
                try:
                    return graph(past_keys, past_values, tensors)
                except AssertionError as error:  # its guards (checked before anything runs) reject these sizes
                    if not str(error).startswith("Guard failed"):
                        raise
            graph = self._trace(own, leaves, spec, past_keys, past_values)
            self.graphs.setdefault(key, []).append(graph)
            return graph(past_keys, past_values, tensors)
        finally:
            _CURRENT_CALL.reset(token)

    def _seen(self, cache: Cache) -> int:
        """Tokens the module's layer of `cache` has seen (its logical length)."""
        layers = getattr(cache, "layers", ())
        return layers[self.module.layer_idx].get_seq_length() if len(layers) > self.module.layer_idx else 0

    def _trace(self, own, leaves: list, spec: Any, past_keys: torch.Tensor,
               past_values: torch.Tensor) -> torch.fx.GraphModule:
        name = self.site.name
        if sum(map(len, self.graphs.values())) >= MAX_TRACES:
            raise UnsupportedModelError(
                f"{name} computes attention itself and needed more than {MAX_TRACES} traces (one per call signature "
                "and per range of sizes its code branches on): kvpass stops there")
        device = next(self.module.parameters()).device
        examples = [torch.zeros(past.shape, dtype=past.dtype, device=device) for past in (past_keys, past_values)]
        tensors = tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
        try:
            captured = capture(_Step(own, leaves, spec), (*examples, tensors), {}, dynamic=True)
        except KVPassError as error:
            raise UnsupportedModelError(
                f"{name} computes attention itself and kvpass cannot trace it: {error}") from error
        report = find_sites(captured.graph_module)
        kv_heads, key_dim, _ = self.kv_shape
        if len(report) != 1 or (report[0].num_kv_heads, report[0].head_dim) != (kv_heads, key_dim):
            reasons = "; ".join(u.reason for u in report.unsupported)
            raise UnsupportedModelError(
                f"{name} computes attention itself, and its traced forward shows "
                f"{[(s.num_heads, s.num_kv_heads, s.head_dim) for s in report] or 'no attention'} rather than one "
                f"attention over the {kv_heads} KV heads of {key_dim} features it caches"
                + (f" ({reasons})" if reasons else ""))
        site = replace(report[0], name=name)  # the trace names modules relative to the step
        return rewrite_module_attention(captured.graph_module, site, attend_through_interface)


class _Step(torch.nn.Module):
    """One call of an attention module's own forward, with its cache replaced by two tensor inputs."""

    def __init__(self, own, leaves: list, spec: Any):
        super().__init__()
        self.owner = own.__self__  # a submodule, so export lifts its parameters
        self.own, self.leaves, self.spec = own, leaves, spec
        self.train(self.owner.training)  # capture restores the step's mode, and with it the owner's

    def forward(self, past_keys: torch.Tensor, past_values: torch.Tensor, tensors: tuple) -> Any:
        cache = _TensorCache(past_keys, past_values)
        remaining = iter(tensors)
        inputs = [cache if isinstance(leaf, Cache) else next(remaining) if isinstance(leaf, torch.Tensor) else leaf
                  for leaf in self.leaves]
        args, kwargs = torch.utils._pytree.tree_unflatten(inputs, self.spec)
        return self.own(*args, **kwargs)


class _TensorCache:
    """The cache a traced module sees: `update` concatenates the new K/V onto the past graph inputs."""

    def __init__(self, past_keys: torch.Tensor, past_values: torch.Tensor):
        self.past_keys, self.past_values = past_keys, past_values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.past_keys, key_states], dim=-2), torch.cat([self.past_values, value_states], dim=-2)

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.past_keys.shape[-2]


def _kv_shape(own, leaves: list, spec: Any, seen: int) -> tuple[int, int, int]:
    """(KV heads, key dim, value dim) of what the module's own forward hands its cache, from one call of it on a
    cache of zeros of the logical length (the module may check its mask against that length)."""
    found = []

    class Recording(_TensorCache):
        def update(self, key_states, value_states, *args, **kwargs):
            found.append((key_states.shape[1], key_states.shape[-1], value_states.shape[-1]))
            self.past_keys = key_states.new_zeros(*key_states.shape[:-2], seen, key_states.shape[-1])
            self.past_values = value_states.new_zeros(*value_states.shape[:-2], seen, value_states.shape[-1])
            return super().update(key_states, value_states)

    inputs = [Recording(None, None) if isinstance(leaf, Cache) else leaf for leaf in leaves]
    args, kwargs = torch.utils._pytree.tree_unflatten(inputs, spec)
    with torch.no_grad():
        own(*args, **kwargs)
    if len(found) != 1:
        raise UnsupportedModelError(f"{type(own.__self__).__name__} updated its cache {len(found)} times in one call: "
                                    "kvpass adapts a module that updates it once, then attends")
    return found[0]


def _signature(leaves: list, past: torch.Tensor) -> tuple:
    """What a trace is specialised on: each input's dtype, device and which sizes are 0 or 1 (torch.export
    fixes those), whether a cache is given, and the values of the other arguments."""
    def describe(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return leaf.dtype, leaf.device.type, tuple(min(size, 2) for size in leaf.shape)
        if isinstance(leaf, Cache):
            return "cache"
        return type(leaf).__name__, leaf if isinstance(leaf, (bool, int, float, str, type(None))) else id(leaf)

    return (describe(past), *map(describe, leaves))


def attend_through_interface(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, bias: torch.Tensor | None,
                             causal: bool, scale: float) -> torch.Tensor:
    """What replaces a traced module's cache update and attention (`ModuleAttention`): update the call's cache
    with the new K/V, then run the registered attention function over what the cache returns."""
    call = _CURRENT_CALL.get()
    keys, values = k_new, v_new
    if call.cache is not None:
        keys, values = call.cache.update(k_new, v_new, call.module.layer_idx)
    out, _ = call.function(call.module, q, keys, values, bias, dropout=0.0, scaling=scale,
                           is_causal=causal if bias is None else False, **call.keywords)
    return out.transpose(1, 2)  # the interface returns [B, L, H, D]


def adapt_self_computing(model: torch.nn.Module, sites: list[AttentionSite]) -> list[str]:
    """Give every site module of `model` that computes attention itself an `InterfaceAdapter`; returns their
    names. A site is self-computing when a short forward under a counting implementation never reaches it."""
    modules = dict(model.named_modules())
    reached: set[int] = set()

    def count(module, query, key, value, attention_mask, **kwargs):
        reached.add(id(module))
        return AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, **kwargs)

    text = model.config.get_text_config(decoder=True)
    vocab = getattr(text, "vocab_size", None) or 2
    ids = (torch.arange(4) % max(vocab - 1, 1) + 1).unsqueeze(0).to(next(model.parameters()).device)
    configs = [c for c in {id(c): c for c in (getattr(m, "config", None) for m in model.modules())}.values()
               if c is not None and hasattr(c, "_attn_implementation")]
    marked = any(map(hf_attention.uses_eager_masks, configs))
    # Self-computing modules add their mask to their logits: under any implementation but the model's own
    # fused ones they take their eager branch, written for eager (additive) masks.
    hf_attention.use_eager_masks(configs)
    try:
        with hf_attention.attention_implementation(model, "kvpass_reach", count), torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception:  # noqa: BLE001 - a model that cannot run this way is refused by binding's own probe, by name
        return []
    finally:
        hf_attention.use_eager_masks(configs, marked)
    by_name = {site.name: site for site in sites}
    adapted = [name for name in by_name if id(modules[name]) not in reached]
    for name in adapted:
        InterfaceAdapter(modules[name], by_name[name], model.config).install()
    if any(isinstance(modules[name].__dict__.get("forward"), InterfaceAdapter) for name in by_name):
        hf_attention.use_eager_masks(configs)  # also for a copy of an adapted model (its configs are new objects)
    return adapted
