"""Binding a plan's eviction onto a Hugging Face causal LM, and proving every site runs through it.

Each site's attention module is routed through the "kvpass" attention implementation and its
layer of the model's cache becomes a compacted layer (`kvpass.runtime.hf`). A probe forward
then checks that every site really ran through kvpass: a site that does not is an error,
never a silent no-op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvpass.errors import UnsupportedModelError
from kvpass.hf_attention import set_attn_implementation
from kvpass.planning import Plan
from kvpass.runtime import hf
from kvpass.runtime.reallocation import ReallocationPolicy
from kvpass.site import SiteReport


def bind_plan(model: torch.nn.Module, sites: SiteReport, plan: Plan) -> Callable[[], None]:
    """Route `model`'s sites onto compacted caches under `plan`; returns the undo."""
    config = model.config
    refuse_unsupported(model, sites)
    modules = dict(model.named_modules())
    dtype_bytes = next(model.parameters()).element_size()
    policy = (ReallocationPolicy.from_plan(plan, [site.name for site in sites], dtype_bytes)
              if plan.reallocate else None)
    bindings = {
        site.name: hf.SiteBinding(site=site, method=plan.method, schedule=plan.schedule(site, dtype_bytes),
                                  reallocation=policy, index=index, heads=plan.head_schedule(site, dtype_bytes))
        for index, site in enumerate(sites)
    }
    previous_bindings = getattr(model, "kvpass_bindings", None)
    previous = config._attn_implementation
    if previous_bindings:  # re-optimizing replaces the plan
        hf.unbind(modules, previous_bindings)

    def undo() -> None:
        hf.unbind(modules, bindings)
        if previous_bindings:
            hf.bind(model, modules, previous_bindings)
        set_attn_implementation(model, previous)
        model.kvpass_bindings = previous_bindings

    try:
        hf.bind(model, modules, bindings)
        set_attn_implementation(model, hf.IMPLEMENTATION)
        _probe(model, bindings)
    except Exception:
        undo()
        raise
    model.kvpass_bindings = bindings
    return undo


def refuse_unsupported(model: torch.nn.Module, sites: SiteReport) -> None:
    """Raise for HF models whose caches kvpass cannot compact (yet)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError("encoder-decoder models are not supported by kvpass.optimize yet")
    text = config.get_text_config(decoder=True)
    layer_types = set(getattr(text, "layer_types", None) or [])
    if getattr(text, "sliding_window", None) is not None or layer_types - {"full_attention"}:
        raise UnsupportedModelError(
            "sliding-window / chunked / hybrid attention layers are not supported yet: their cache already "
            "drops tokens by position, and kvpass would evict on top of it"
        )
    if getattr(text, "kv_lora_rank", None):
        raise UnsupportedModelError("multi-head latent attention (compressed KV) is not supported yet")
    if not any(site.causal for site in sites):
        raise UnsupportedModelError(f"{type(model).__name__} has no causal self-attention: no KV cache to prune")


def _probe(model: torch.nn.Module, bindings: dict[str, hf.SiteBinding]) -> None:
    """One tiny cached forward; every bound site must have run through kvpass exactly once."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    for binding in bindings.values():
        binding.calls = 0
    with torch.no_grad():
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    silent = [name for name, binding in bindings.items() if binding.calls != 1]
    if silent:
        raise UnsupportedModelError(
            f"these attention sites do not dispatch through transformers' attention interface, so kvpass "
            f"cannot rewrite them: {silent}"
        )
