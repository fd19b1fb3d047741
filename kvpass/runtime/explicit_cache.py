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
    return rewrite_cached_sites(captured.graph_module, sites,
                                lambda site: _evicting_attention(site, planned[site.name], plan))


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
