"""kvpass.export_onnx: a torch causal LM → a pruned ONNX decode-step model with KV-cache I/O.

The unoptimized model is exported as one step `(input_ids, attention_mask, position_ids, past_k_0,
past_v_0, ...) -> (logits, present_k_0, present_v_0, ...)` with `torch.onnx.export(dynamo=True)`,
then the ONNX pass (`kvpass.onnx.optimize`) rewrites it. Position ids are an input because after
eviction the cache is shorter than the positions imply. `attention_mask` [batch, cached + new]
covers the *physical* cache (0 for padding still held, then the new tokens'): the model's causal
mask only needs slot order (each new token sees every cached one), which compaction keeps.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import numpy as np
import onnx
import torch

from kvpass.runtime.call_arguments import cache_argument, output_cache
from kvpass.budget import parse_budget
from kvpass.errors import UnsupportedModelError
from kvpass.hf_attention import cache_windows, set_attn_implementation
from kvpass.methods import Method, get_method
from kvpass.onnx import find_attention, optimize
from kvpass.planning import Plan
from kvpass.runtime import hf
from kvpass.rewrites.onnx import MASK_INPUT, MIN_OPSET
from kvpass.transforms import Evict, StreamingHeads
from kvpass.validation import integer


class _DecodeStep(torch.nn.Module):
    """One cached forward of a HF causal LM over explicit cache tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         **cache_argument(self.model, cache), use_cache=True)
        return (out.logits, *[t for layer in output_cache(out).layers for t in (layer.keys, layer.values)])


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    budget: float = 0.5,
    method: str | Method | None = None,
    plan: Plan | None = None,
    opset: int = 23,
) -> onnx.ModelProto:
    """Export a HF causal LM (plain, or optimized by `kvpass.optimize`: its `kvpass_plan` is
    used) to a pruned ONNX file at `path`; returns the saved ModelProto.

    Inputs: input_ids, position_ids [batch, seq]; attention_mask [batch, cached + seq]; past_k_i / past_v_i [batch, kv_heads, past, head_dim];
    kvpass_past_slots_i and kvpass_evict for pruned layers (fed by `kvpass.onnx.Generator`).
    A plan whose KV heads keep different numbers of tokens (`Evict(per_head=True)`, `StreamingHeads`)
    exports packed caches instead: `kvpass_past_packed_{key,value,slots}_i` rows plus
    `kvpass_past_lengths_i` [batch, kv_heads] (`kvpass.rewrites.onnx_ragged`, which names what it refuses).

    Example:
        >>> kvpass.export_onnx(model, "model.onnx", budget=0.5)              # doctest: +SKIP
        >>> kvpass.onnx.Generator("model.onnx").generate(ids, max_new_tokens=32)  # doctest: +SKIP
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face causal LM (torch.nn.Module with a config), got {type(model).__name__}")
    # Every argument is checked before the export, which takes a while.
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    opset = integer(opset, "opset", minimum=MIN_OPSET, meaning="the ONNX opsets kvpass rewrites")
    parse_budget(budget)
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"plan must be a kvpass Plan (from kvpass.plan(...) or kvpass.Plan.load(path)), "
                        f"got {type(plan).__name__}")
    own_plan = plan is None and getattr(model, "kvpass_plan", None) is not None
    plan = plan if plan is not None else getattr(model, "kvpass_plan", None)
    if plan is not None and method is not None:
        raise TypeError("give method= or a plan, not both: the plan (given, or the one the model was optimized "
                        "with) already names its method")
    get_method(method)
    windowed = sorted(cache_windows(model))
    if windowed:
        raise UnsupportedModelError(
            f"kvpass.export_onnx exports full-attention caches only: layers {windowed} keep a sliding window or "
            "chunks, whose mask the exported step cannot take over the compacted cache; serve this model with "
            "kvpass.optimize in torch")
    with _unoptimized(model):
        proto = _export_step(model, opset, _kv_heads(model, plan))
    if plan is not None:
        plan = _rename_plan(plan, getattr(model, "kvpass_sites", None) or list(plan.budgets), proto, own_plan)
    pruned = optimize(proto, budget, method, plan=plan)
    onnx.save(pruned, os.fspath(path))
    return pruned


@contextlib.contextmanager
def _unoptimized(model: torch.nn.Module):
    """Temporarily route a `kvpass.optimize`d model back to SDPA, so the export sees plain attention."""
    bindings = getattr(model, "kvpass_bindings", None)
    if not bindings:
        yield
        return
    modules = dict(model.named_modules())
    hf.unbind(modules, bindings)
    previous = set_attn_implementation(model, "sdpa")
    try:
        yield
    finally:
        set_attn_implementation(model, previous)
        hf.bind(model, modules, bindings)


def _kv_heads(model: torch.nn.Module, plan: Plan | None) -> list[int]:
    """KV heads of every layer's cache: the config's, less the heads kvpass removed."""
    config = model.config.get_text_config(decoder=True)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    sites = getattr(model, "kvpass_sites", None)
    if plan is None or not plan.pruned_heads or not sites:
        return [kv_heads] * config.num_hidden_layers
    return [plan.geometry(site).num_kv_heads for site in sites]


def _export_step(model: torch.nn.Module, opset: int, kv_heads: list[int]) -> onnx.ModelProto:
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    param = next(model.parameters())
    batch, seq, past = 2, 5, 3  # distinct sizes, none 0 or 1, so the exporter keeps them symbolic
    ids = torch.ones(batch, seq, dtype=torch.long, device=param.device)
    mask = torch.ones(batch, past + seq, dtype=torch.long, device=param.device)
    positions = torch.arange(past, past + seq, device=param.device).expand(batch, seq)
    caches = [torch.zeros(batch, heads, past, head_dim, dtype=param.dtype, device=param.device)
              for heads in kv_heads for _ in "kv"]
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    names = [f"past_{kv}_{i}" for i in range(config.num_hidden_layers) for kv in "kv"]
    with torch.no_grad():
        program = torch.onnx.export(
            _DecodeStep(model).eval(), (ids, mask, positions, *caches), dynamo=True, opset_version=opset, verbose=False,
            dynamic_shapes={"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: torch.export.Dim.DYNAMIC},
                            "position_ids": {0: b, 1: s}, "past": tuple({0: b, 2: p} for _ in caches)},
            input_names=["input_ids", MASK_INPUT, "position_ids", *names],
            output_names=["logits", *[n.replace("past", "present") for n in names]],
        )
    return program.model_proto


def _rename_plan(plan: Plan, torch_sites: list, proto: onnx.ModelProto, own_plan: bool) -> Plan:
    """The torch plan's eviction, for the exported graph: keyed by ONNX site names (matched by
    layer order), with the graph's own geometry (removed heads are already gone from it). The
    plan an optimized model carries also takes the graph's element size: the model may have been
    cast since, and its byte cap follows its cache, as in the torch runtime."""
    onnx_sites = find_attention(proto)
    if own_plan:
        plan = replace(plan, dtype_bytes=np.dtype(onnx_sites[0].dtype).itemsize)
    names = [getattr(site, "name", site) for site in torch_sites]
    if len(names) != len(onnx_sites):
        raise ValueError(f"plan has {len(names)} sites but the exported graph has {len(onnx_sites)} attention sites")
    pairs = list(zip(onnx_sites, names))
    kept = [record for record in plan.transforms if record["name"] in (Evict.name, StreamingHeads.name)]
    streaming = {site.name: _kept_positions(plan, name, plan.streaming_heads[name])
                 for site, name in pairs if plan.streaming_heads.get(name)}
    if not any(record["name"] == Evict.name for record in kept) and not streaming:
        kept.append(Evict(plan.method).record())
    method = plan.method if streaming else plan.method or get_method(None)  # streaming alone ranks by recency
    return replace(plan, method=method, budgets={site.name: plan.budgets[name] for site, name in pairs},
                   max_tokens={site.name: plan.max_tokens[name] for site, name in pairs if name in plan.max_tokens},
                   sites=list(onnx_sites), pruned_heads={}, head_importance={}, transforms=kept,
                   streaming_heads=streaming,
                   head_shares={site.name: plan.head_shares[name] for site, name in pairs if name in plan.head_shares})


def _kept_positions(plan: Plan, site_name: str, heads: list[int]) -> list[int]:
    """`heads` (original KV head indices) as positions among the heads the export keeps."""
    removed = set(plan.pruned_heads.get(site_name, ()))
    site = next(site for site in plan.sites if site.name == site_name)
    kept = [head for head in range(site.num_kv_heads) if head not in removed]
    return [kept.index(head) for head in heads]
