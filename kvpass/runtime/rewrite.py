"""Applying a Plan to a model: choose how its sites are rewritten, then prove they were.

Two kinds of model own a KV cache:

* Hugging Face causal LMs, whose `generate` owns a `Cache` object: each matched
  attention module is routed through kvpass (`kvpass.runtime.hf`);
* any model whose forward carries its own cache tensors in and out: its exported FX
  graph is rewritten so the concatenation of past and new K/V and the attention become
  one evicting op (`kvpass.runtime.explicit_cache`).

After rewriting, a probe forward checks that every site really runs through kvpass; a
site that does not is an error, never a silent no-op.
"""

from __future__ import annotations

import torch

from kvpass.errors import UnsupportedModelError
from kvpass.plan import Plan
from kvpass.runtime import hf
from kvpass.runtime.reallocation import ReallocationPolicy
from kvpass.site import SiteReport


def rewrite_model(model: torch.nn.Module, report: SiteReport, plan: Plan, example_inputs: tuple | None):
    """Rewrite `model` in place for `plan` (HF) or return the rewritten module (explicit cache)."""
    if _is_hf_causal_lm(model):
        return _rewrite_hf(model, report, plan)
    if any(site.reads_cache for site in report):
        from kvpass.runtime.explicit_cache import rewrite_explicit_cache

        if plan.reallocate:
            raise UnsupportedModelError(
                f"plan.reallocate={plan.reallocate}: re-allocation while decoding needs one cache object shared by "
                f"every site (Hugging Face models); {type(model).__name__} carries its caches as separate tensors"
            )
        return rewrite_explicit_cache(model, report, plan, example_inputs)
    raise UnsupportedModelError(
        f"{type(model).__name__} has {len(report)} attention sites but no KV cache to prune "
        "(an encoder, or a model that recomputes attention each call); token-pruning methods for "
        "encoders are not implemented yet"
    )


def _is_hf_causal_lm(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return hasattr(model, "generate") and config is not None and hasattr(config, "_attn_implementation")


def _rewrite_hf(model: torch.nn.Module, report: SiteReport, plan: Plan) -> torch.nn.Module:
    config = model.config
    _refuse_unsupported_hf(model, report)
    modules = dict(model.named_modules())
    dtype_bytes = next(model.parameters()).element_size()
    policy = (ReallocationPolicy.from_plan(plan, [site.name for site in report], dtype_bytes)
              if plan.reallocate else None)
    bindings = {
        site.name: hf.SiteBinding(site=site, method=plan.method, schedule=plan.schedule(site, dtype_bytes),
                                  reallocation=policy, index=index)
        for index, site in enumerate(report)
    }
    previous_bindings = getattr(model, "kvpass_bindings", None)
    previous = config._attn_implementation
    if previous_bindings:  # re-optimizing replaces the plan
        hf.unbind(modules, previous_bindings)
    hf.bind(model, modules, bindings)
    try:
        hf.set_attn_implementation(model, hf.IMPLEMENTATION)
        _probe(model, bindings)
    except Exception:
        hf.unbind(modules, bindings)
        if previous_bindings:
            hf.bind(model, modules, previous_bindings)
        hf.set_attn_implementation(model, previous)
        raise
    model.kvpass_plan, model.kvpass_sites, model.kvpass_bindings = plan, report, bindings
    return model


def _refuse_unsupported_hf(model: torch.nn.Module, report: SiteReport) -> None:
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
    if not any(site.causal for site in report):
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
