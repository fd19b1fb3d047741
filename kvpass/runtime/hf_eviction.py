"""Binding a plan's eviction onto a Hugging Face causal LM, and proving every site runs through it exactly.

Each site's attention module is routed through the "kvpass" attention implementation and its
layer of the model's cache becomes a compacted layer (`kvpass.runtime.hf`). A probe then runs
a short prompt and one decode step twice, with the model's own attention and with kvpass's,
and checks, per site: that it ran through kvpass once per forward, on a cache layer kvpass
adopted, and that its output is the model's own (eviction never changes the step that
evicts, so this holds at any budget). A site that fails any of these is an error naming it,
never a silent no-op or a silently different model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from kvpass.errors import KVPassError, UnsupportedModelError
from kvpass.planning import Plan
from kvpass.runtime import hf
from kvpass.runtime.call_arguments import cache_argument, output_cache
from kvpass.runtime.reallocation import ReallocationPolicy
from kvpass.site import SiteReport

PROBE_LENGTH = 6
"""Tokens of the probe prompt (then one decode step)."""
ORIGINAL_IMPLEMENTATION = "kvpass_original_attn_implementation"
"""Where a bound model remembers its bound configs' own attention implementations (re-optimizing probes against them)."""


def bind_plan(model: torch.nn.Module, sites: SiteReport, plan: Plan) -> Callable[[], None]:
    """Route `model`'s sites onto compacted caches under `plan`; returns the undo."""
    refuse_unsupported(model, sites)
    modules = dict(model.named_modules())
    dtype_bytes = next(model.parameters()).element_size()
    policy = (ReallocationPolicy.from_plan(plan, [site.name for site in sites], dtype_bytes)
              if plan.reallocate else None)
    bindings = {
        site.name: hf.SiteBinding(site=site, method=plan.method, schedule=plan.schedule(site, dtype_bytes),
                                  reallocation=policy, index=index, model_mask=site.window is not None,
                                  heads=plan.head_schedule(site, dtype_bytes))
        for index, site in enumerate(sites)
    }
    previous_bindings = getattr(model, "kvpass_bindings", None)
    # Only the bound modules' configs are pointed at kvpass: a vision-language model's vision
    # encoder keeps its own attention (it has no KV cache to compact).
    configs = list({id(config): config for config in (getattr(modules[name], "config", model.config)
                                                      for name in bindings)}.values())
    previous = [config._attn_implementation for config in configs]
    original = getattr(model, ORIGINAL_IMPLEMENTATION, previous)
    if previous_bindings:  # re-optimizing replaces the plan
        hf.unbind(modules, previous_bindings)

    def point(implementations: list[str]) -> None:
        for config, implementation in zip(configs, implementations):
            config._attn_implementation = implementation

    def undo() -> None:
        hf.unbind(modules, bindings)
        if previous_bindings:
            hf.bind(model, modules, previous_bindings)
        point(previous)
        model.kvpass_bindings = previous_bindings

    try:
        point(original)
        try:
            reference = _run_probe(model, modules, bindings)
        except Exception as error:
            raise UnsupportedModelError(f"{type(model).__name__} cannot run a cached forward by itself "
                                        f"({type(error).__name__}: {error}), so kvpass cannot check its rewrite") from error
        hf.bind(model, modules, bindings)
        point([hf.IMPLEMENTATION] * len(configs))
        _check_probe(model, modules, bindings, reference)
        masked = [name for name, binding in bindings.items() if binding.heads is not None and binding.model_mask]
        if masked:
            raise UnsupportedModelError(
                f"{type(model).__name__} gives {masked} an attention mask that says more than causal + padding; "
                "a ragged cache (per-head budgets, streaming heads) applies causal + padding only")
    except Exception:
        undo()
        raise
    model.kvpass_bindings = bindings
    setattr(model, ORIGINAL_IMPLEMENTATION, original)
    return undo


STATE_LAYERS = {"linear_attention": "linear attention / state-space (Mamba)", "conv": "short convolution",
                "hybrid": "attention beside a state-space mixer", "hybrid_sliding": "attention beside a state-space mixer"}
LATENT_LAYERS = {"indexed_attention": "sparse (indexed) latent attention",
                 "heavily_compressed_attention": "compressed latent attention",
                 "compressed_sparse_attention": "compressed sparse attention"}
"""transformers layer types whose cache is not softmax attention's K/V (or not only), by what they keep."""


def refuse_config(model: torch.nn.Module) -> None:
    """Raise, before anything is captured, for HF models whose caches are not K/V kvpass can compact,
    naming what they keep instead."""
    config, what = model.config, type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{what} is an encoder-decoder model: kvpass.optimize supports decoder caches only")
    text = config.get_text_config(decoder=True)
    if getattr(text, "kv_lora_rank", None):
        raise UnsupportedModelError(
            f"{what} uses multi-head latent attention (K/V decompressed from a low-rank latent, kv_lora_rank): "
            "kvpass does not compact latent caches yet")
    types = set(getattr(text, "layer_types", None) or [])
    kinds = sorted({STATE_LAYERS[t] for t in types & STATE_LAYERS.keys()}
                   | {LATENT_LAYERS[t] for t in types & LATENT_LAYERS.keys()})
    if kinds:
        raise UnsupportedModelError(
            f"{what} has layers whose cache is not softmax attention's keys and values ({'; '.join(kinds)}): kvpass "
            "prunes K/V caches and cannot bound a recurrent state or a compressed latent")


def refuse_unsupported(model: torch.nn.Module, sites: SiteReport) -> None:
    """Raise for HF models whose caches kvpass cannot compact (yet), naming what is missing."""
    refuse_config(model)
    if not any(site.causal for site in sites):
        raise UnsupportedModelError(f"{type(model).__name__} has no causal self-attention: no KV cache to prune")
    cross = [site.name for site in sites if site.cross]
    if cross:
        raise UnsupportedModelError(f"{type(model).__name__} has cross-attention sites {cross}: kvpass prunes the "
                                    "decoder's self-attention cache of decoder-only models")


def _run_probe(model: torch.nn.Module, modules: dict, bindings: dict[str, hf.SiteBinding]) -> dict[str, list]:
    """A short prompt and one cached decode step; returns every site module's outputs."""
    outputs, hooks = {}, []
    for name in bindings:
        outputs[name] = []

        def record_output(module, args, output, name=name):
            first = output[0] if isinstance(output, (tuple, list)) else output
            outputs[name].append(first.detach().clone() if isinstance(first, torch.Tensor) else None)

        hooks.append(modules[name].register_forward_hook(record_output))
    text = model.config.get_text_config(decoder=True)
    vocab = getattr(text, "vocab_size", None) or 2
    ids = (torch.arange(PROBE_LENGTH + 1) * 7 % max(vocab - 1, 1) + 1).unsqueeze(0).to(next(model.parameters()).device)
    try:
        with torch.no_grad():
            past = output_cache(model(input_ids=ids[:, :-1], use_cache=True))
            model(input_ids=ids[:, -1:], **cache_argument(model, past), use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def _more_than_causal(mask: torch.Tensor | None) -> bool:
    """Whether a mask the model gave an attention module says more than causal (it may also carry
    padding, which the probe has none of): a window, chunks, a bias, bidirectional parts."""
    if mask is None:
        return False
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return True
    if mask.dtype == torch.bool:
        visible = mask
    else:
        visible = mask == 0
        if bool((~visible & (mask > torch.finfo(mask.dtype).min / 2)).any()):
            return True  # an additive bias, not only blocked positions
    rows, columns = visible.shape[-2:]
    causal = torch.ones(rows, columns, dtype=torch.bool, device=mask.device).tril(columns - rows)
    return not bool((visible == causal).all())


def _check_probe(model: torch.nn.Module, modules: dict, bindings: dict[str, hf.SiteBinding],
                 reference: dict[str, list]) -> None:
    """Run the probe through kvpass; every site must run once per forward, on an adopted cache layer,
    and give the model's own output. A site given a mask that says more than causal + padding
    switches to applying the model's mask, and the probe runs again."""
    probe = _kvpass_probe(model, modules, bindings)
    switched = [binding for binding in bindings.values()
                if not binding.model_mask and any(_more_than_causal(mask) for mask in binding.masks)]
    if switched:
        for binding in switched:
            binding.model_mask = True
        probe = _kvpass_probe(model, modules, bindings)
    for binding in bindings.values():
        binding.masks = []
    what = type(model).__name__
    silent = [name for name, binding in bindings.items() if binding.calls == 0]
    if silent:
        raise UnsupportedModelError(
            f"these attention sites do not dispatch through transformers' attention interface, so kvpass "
            f"cannot rewrite them: {silent}"
        )
    repeated = {name: binding.calls // 2 for name, binding in bindings.items() if binding.calls > 2}
    if repeated:
        raise UnsupportedModelError(
            f"attention modules run several times per forward ({repeated}: a module shared by several layers, or "
            "several attentions in one module): kvpass keeps one cache layer per attention module")
    unadopted = [name for name, binding in bindings.items() if binding.adopted < binding.calls]
    if unadopted:
        raise UnsupportedModelError(
            f"{what} does not hand its cache to {unadopted} as a transformers Cache (a legacy tuple cache, or a cache "
            "kept inside the module), so kvpass cannot compact it: it would stay full size")
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    for name, outputs in probe.items():
        for step, (got, want) in enumerate(zip(outputs, reference[name])):
            if got is None or want is None or got.shape != want.shape:
                continue
            error = (got.float() - want.float()).abs().max().item()
            if not error <= tolerance * (1 + want.float().abs().max().item()):
                extra = bindings[name].site.logit_ops
                raise UnsupportedModelError(
                    f"kvpass's attention does not reproduce {name} of {what} ({'prefill' if step == 0 else 'decode'} "
                    f"output differs by {error:.2e}): its attention does something kvpass does not model"
                    + (f" (logit ops: {extra})" if extra else ""))


def _kvpass_probe(model: torch.nn.Module, modules: dict, bindings: dict[str, hf.SiteBinding]) -> dict[str, list]:
    """The probe through kvpass with nothing evicted (so the decode step must equal the model's too),
    counting each site's calls and adopted caches and recording the masks it is given."""
    kept = {name: (binding.schedule, binding.reallocation, binding.heads) for name, binding in bindings.items()}
    for binding in bindings.values():
        binding.calls = binding.adopted = 0
        binding.masks, binding.recording = [], True
        binding.schedule = replace(binding.schedule, fraction=1.0, max_tokens=None, shared=None)
        binding.reallocation = binding.heads = None
    try:
        return _run_probe(model, modules, bindings)
    except KVPassError:
        raise
    except Exception as error:
        raise UnsupportedModelError(
            f"{type(model).__name__} fails when its attention runs through kvpass ({type(error).__name__}: {error}); "
            "its own code around the attention (mask helpers, cache handling) does not accept another implementation"
        ) from error
    finally:
        for name, binding in bindings.items():
            binding.schedule, binding.reallocation, binding.heads = kept[name]
            binding.recording = False
