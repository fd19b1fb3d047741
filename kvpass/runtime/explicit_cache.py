"""Models that carry their own cache tensors: an FX graph rewrite onto evicting attention.

For `forward(input_ids, position_ids, past_keys, past_values) -> (logits, keys, values)`
the model is exported, each site's `cat(past, new)` + attention becomes one call that
attends over the cache and returns *compacted* present K/V, and the rewritten graph keeps
the model's signature. It is exported with free sizes, so it decodes step after step while
its cache grows and shrinks (sizes that are 1 in the example inputs, such as a batch of one,
stay fixed). The cache tensors are all the state there is, so:

* positions must be explicit inputs (the logical position of the new tokens);
* past tokens are taken to sit just before the first new position (true for the recent
  window, which eviction always keeps; older kept tokens only lose their exact slot, which
  matters to the `recent` carve-out alone);
* statistics come from the current call's queries only (no running H2O sums across calls).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kvpass.capture import capture
from kvpass.errors import UnsupportedModelError
from kvpass.planning import Plan
from kvpass.rewrites.fx import find_sites, rewrite_cached_sites
from kvpass.runtime.compacted_cache import CompactedKV
from kvpass.site import AttentionSite, SiteReport


def rewrite_explicit_cache(
    model: torch.nn.Module, report: SiteReport, plan: Plan, example_inputs: tuple | None
) -> torch.fx.GraphModule:
    """The rewritten graph module (the original model is left untouched). `report` holds the sites
    of the unmodified model, whose geometry `plan` is relative to; the model may since have lost
    heads (structural transforms), so it is captured again from `example_inputs` as it is now."""
    if example_inputs is None:
        raise ValueError(
            "example_inputs is required for a model that carries its own cache tensors: "
            "pass the tuple of positional arguments of one decode step"
        )
    captured = capture(model, example_inputs, {}, dynamic=True)
    sites = find_sites(captured.graph_module)
    not_cached = [site.name for site in sites if not site.reads_cache]
    if not_cached:
        raise UnsupportedModelError(
            f"sites {not_cached} do not read a cache passed in as a graph input, so kvpass cannot prune them"
        )
    planned = {site.name: site for site in report}
    unplanned = [site.name for site in sites if site.name not in planned]
    if unplanned:
        raise UnsupportedModelError(f"sites {unplanned} of the captured model are not in the plan")
    missed = [site.name for site in report if site.name not in {found.name for found in sites}]
    if missed:  # never return a model that silently leaves a planned site unpruned
        reasons = "; ".join(f"{u.name} ({u.reason})" for u in sites.unsupported)
        raise UnsupportedModelError(f"sites {missed} were not found again when the model was captured with free "
                                    f"sizes{': ' + reasons if reasons else ''}")
    sites = [_with_positions(site, example_inputs) for site in sites]
    rewritten = rewrite_cached_sites(captured.graph_module, sites,
                                     lambda site: _evicting_attention(site, planned[site.name], plan))
    _check_step(model, rewritten, example_inputs, sites)
    return rewritten


def _with_positions(site: AttentionSite, example_inputs: tuple) -> AttentionSite:
    """The site with the graph input that positions its new queries: the one its RoPE reads, or else
    (absolute position embeddings) the integer input holding past length + 0..T-1 in the example."""
    cache = site.match.cache
    if cache.q_positions:
        return site
    inputs = torch.utils._pytree.tree_leaves(example_inputs)
    past, new = inputs[cache.past_k_index].shape[-2], cache.new_tokens
    expected = torch.arange(past, past + new)
    found = [name for name, index in cache.position_candidates
             if inputs[index].numel() % new == 0 and torch.equal(inputs[index].reshape(-1, new)[0].cpu(), expected)]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"{site.name}: positions must be an explicit input: no integer input of the example holds the new "
            f"tokens' positions ({past}..{past + new - 1}, after {past} cached tokens); kvpass needs them to keep "
            "positions right once the cache is compacted")
    return replace(site, match=replace(site.match, cache=replace(cache, q_positions=found[0])))


def _check_step(model: torch.nn.Module, rewritten: torch.nn.Module, example_inputs: tuple, sites) -> None:
    """The rewritten model's outputs on the example step, besides the present K/V it compacts, must be the
    model's own (eviction comes after the step's attention): anything the rewrite does not reproduce
    (a bias or mask beyond causal, logit ops) is refused here, never left silently different."""
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(model(*example_inputs))
        got = torch.utils._pytree.tree_leaves(rewritten(*example_inputs))
    caches = {index for site in sites for index in site.match.cache.present_k_outputs
              + site.match.cache.present_v_outputs}
    for index, (a, b) in enumerate(zip(got, want)):
        if index in caches or not isinstance(b, torch.Tensor) or a.shape != b.shape:
            continue
        tolerance = 1e-4 if b.dtype == torch.float32 else 2e-2
        if not torch.allclose(a.float(), b.float(), rtol=tolerance, atol=tolerance):
            raise UnsupportedModelError(
                f"the rewritten {type(model).__name__} does not reproduce output {index} of the example step "
                f"(differs by {(a.float() - b.float()).abs().max().item():.2e}): its attention does more than "
                f"causal softmax attention over the cache (logit ops: "
                f"{sorted({op for site in sites for op in site.logit_ops}) or 'none'}, or a mask or bias)")


def _evicting_attention(site: AttentionSite, planned: AttentionSite, plan: Plan):
    """The callable that replaces one site (`planned`: the same site in the unmodified model):
    attention over past + new, then eviction to the cap."""
    scale = site.scale if site.scale is not None else site.head_dim**-0.5

    def evicting_attention(q, k_new, v_new, past_k, past_v, q_positions):
        cache = CompactedKV(plan.schedule(planned, k_new.element_size()), plan.method, site.group_size)
        first = int(q_positions.reshape(-1)[0])
        batch, heads, past, _ = past_k.shape
        cache.seen = first  # every earlier token was seen, whether or not the cache still holds it
        if past or first:
            cache.keys, cache.values = past_k, past_v
            cache.slots = torch.arange(first - past, first, dtype=torch.int32, device=past_k.device).expand(
                batch, heads, past).contiguous()
        cache.extend(k_new, v_new)
        out = cache.attend(q, scale, causal=True)  # a decoder reading a growing cache is causal
        return out, cache.keys, cache.values

    evicting_attention.__name__ = f"kvpass_evicting_attention_{site.layer}"
    return evicting_attention
