"""The main job: optimize the real SmolLM2 model and show what pruning cost and saved.

    python examples/passkey_smollm2.py [--budget 0.5] [--samples 4] [--tokens 1500]

Prints the attention sites kvpass found, the KV-cache bytes after the prompt with and
without pruning, and the passkey answers of the full and the pruned model.
"""

from __future__ import annotations

import argparse
import copy
import random

import torch
from transformers import DynamicCache

import kvpass
from kvpass.eval.models import load_smollm2
from kvpass.eval.passkey import is_correct, make_sample
from kvpass.runtime.call_arguments import cache_argument


def answer(model, tokenizer, prompt_ids):
    """(new tokens, KV bytes held after the prompt)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(prompt_ids, **cache_argument(model, cache), max_new_tokens=10, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return out[0, prompt_ids.shape[-1]:], kvpass.cache_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1500)
    args = parser.parse_args()

    base, tokenizer = load_smollm2()
    model = kvpass.optimize(copy.deepcopy(base), budget=args.budget)
    sites = model.kvpass_sites
    site = sites[0]
    print(f"found {len(sites)} attention sites ({site.pattern}, {site.num_heads} query / {site.num_kv_heads} KV heads, "
          f"head_dim {site.head_dim}); unsupported: {len(sites.unsupported)}")
    print(f"rewritten with {model.kvpass_plan.method} at budget {args.budget} "
          f"({model.kvpass_plan.allocation} across layers, sinks {model.kvpass_plan.sinks}, "
          f"recent {model.kvpass_plan.recent})")
    rng = random.Random(0)
    kept = full_ok = 0
    for index in range(args.samples):
        sample = make_sample(tokenizer, args.tokens, rng)
        full_tokens, full_bytes = answer(base, tokenizer, sample.prompt_ids)
        pruned_tokens, pruned_bytes = answer(model, tokenizer, sample.prompt_ids)
        full_ok += is_correct(tokenizer, sample, full_tokens)
        kept += is_correct(tokenizer, sample, pruned_tokens)
        print(f"sample {index}: {sample.prompt_ids.shape[-1]} tokens, key {sample.key} at depth {sample.depth:.2f} | "
              f"full: {tokenizer.decode(full_tokens, skip_special_tokens=True)!r} | "
              f"pruned: {tokenizer.decode(pruned_tokens, skip_special_tokens=True)!r} | "
              f"KV {full_bytes / 2**20:.2f} MiB -> {pruned_bytes / 2**20:.2f} MiB "
              f"({100 * (1 - pruned_bytes / full_bytes):.0f}% saved)")
    print(f"passkey accuracy: full cache {full_ok}/{args.samples}, pruned {kept}/{args.samples}")


if __name__ == "__main__":
    main()
