"""A new kind of pruning in one file: drop each layer's weakest KV head, judged by its value weights.

    python examples/custom_transform.py            # SmolLM2 (3 KV heads per layer: one in three removed)
    python examples/custom_transform.py --tiny     # a tiny random Llama

A transform is a frozen config dataclass that writes its decisions into the plan (`decide`) and
one handler per backend that applies them. This one decides which heads go from the weights
alone (no calibration) and reuses kvpass's own head-removal handler, which slices Q/K/V/O
(fused layouts included), the cache, and the module attributes, then proves the result against
the exact oracle (the same heads' output columns zeroed) or undoes everything. It composes with
eviction under one byte budget: `Evict` supplies whatever saving the removed heads leave.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import kvpass
from kvpass.transforms import Backend, Phase, PlanningContext, Transform, register, remove_planned_heads


@dataclass(frozen=True)
class DropWeakestHead(Transform):
    """In every layer with more than one KV head, remove the one whose value projection has the smallest norm."""

    name = "DropWeakestHead"
    phase = Phase.STRUCTURE
    needs = ("projections",)

    def decide(self, context: PlanningContext) -> None:
        for site in context.sites:
            if site.num_kv_heads < 2:
                continue
            v = site.projections.v
            rows = v.parameter(context.model).detach().narrow(v.axis, v.start, v.size).movedim(v.axis, 0)
            norms = rows.reshape(site.num_kv_heads, -1).norm(dim=-1)
            context.pruned_heads[site.name] = [int(norms.argmin())]


register(DropWeakestHead, Backend.HF, Backend.EXPLICIT_CACHE, Backend.MODULE)(remove_planned_heads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    args = parser.parse_args(argv)

    from hf_generate import load

    model, tokenizer, ids = load(args.tiny)
    parameters = sum(p.numel() for p in model.parameters())
    model = kvpass.optimize(model, budget=args.budget, transforms=[DropWeakestHead(), kvpass.Evict()])
    plan = model.kvpass_plan
    kept = [plan.geometry(site).num_kv_heads for site in plan.sites]
    print(f"KV heads kept per layer: {kept} of {plan.sites[0].num_kv_heads}; "
          f"{parameters - sum(p.numel() for p in model.parameters()):,} parameters removed")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False,
                             pad_token_id=model.generation_config.eos_token_id or 0)
    new = out[0, ids.shape[1]:]
    print("text:", tokenizer.decode(new, skip_special_tokens=True) if tokenizer else new.tolist())
    figures = kvpass.stats(model)
    print(f"KV cache: {figures['kv_bytes']:,} bytes, {figures['kv_bytes'] / figures['full_kv_bytes']:.3f} of the "
          f"unmodified model's; eviction keeps {min(plan.budgets.values()):.0%} of the remaining heads' tokens")
    assert figures["kv_bytes"] <= args.budget * figures["full_kv_bytes"]


if __name__ == "__main__":
    main()
