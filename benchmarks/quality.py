"""Passkey retrieval on SmolLM2 for every method x budget, next to the full cache.

Protocol: DESIGN.md ("Passkey protocol"), both evaluation modes:
  query-aware  - the whole prompt is prefilled, then evicted (what `generate` does);
  context-only - the context is prefilled and evicted before the question arrives
                 (kvpress's protocol; what multi-turn cache reuse needs).
One prefill per sample and mode is shared by every (method, budget) pair
(`kvpass.eval.sweep`). Also prints decode tokens/s and KV bytes, full vs pruned.

    python benchmarks/quality.py --samples 24 --lengths 1500 3000
    python benchmarks/quality.py --samples 4 --lengths 1500 --methods tova tova:span=2 --budgets 0.5
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch

import kvpass
from kvpass.eval.models import load_smollm2
from kvpass.eval.passkey import is_correct, make_sample
from kvpass.eval.sweep import cache_from_recording, record_prefill

MODES = ("query-aware", "context-only")


def parse_method(spec: str):
    """'tova' or 'snapkv:window=16,span=2' -> (label, name, options)."""
    name, _, opts = spec.partition(":")
    options = {k: int(v) for k, v in (kv.split("=") for kv in opts.split(",") if kv)}
    return spec, (None if name == "default" else name), options


def generate_new(model, prompt_ids, cache=None, new_tokens=10):
    with torch.no_grad():
        out = model.generate(prompt_ids, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
    return out[0, prompt_ids.shape[-1]:]


def decode_speed(model, tokenizer, length, steps=64):
    """(tokens/s, peak KV bytes) of a step-by-step greedy decode after a `length`-token prompt."""
    from transformers import DynamicCache

    sample = make_sample(tokenizer, length, random.Random(7))
    cache = DynamicCache(config=model.config)
    peak = 0
    with torch.no_grad():
        logits = model(sample.prompt_ids, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            peak = max(peak, kvpass.cache_bytes(cache))
        elapsed = time.perf_counter() - start
    return steps / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1500, 3000])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--methods", nargs="+", default=["default", *kvpass.METHODS])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_smollm2()
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0)
    methods = [parse_method(spec) for spec in args.methods]
    print(f"default method: {kvpass.get_method()}; sites: {len(model.kvpass_sites)}", flush=True)

    hits: dict[tuple, int] = {}
    full_hits: dict[int, int] = {}
    started = time.perf_counter()
    for length in args.lengths:
        rng = random.Random(args.seed * 1000 + length)
        for index in range(args.samples):
            sample = make_sample(tokenizer, length, rng)
            full_hits[length] = full_hits.get(length, 0) + is_correct(
                tokenizer, sample, generate_new(base, sample.prompt_ids))
            recordings = {
                "query-aware": record_prefill(model, sample.prompt_ids[:, :-1]),
                "context-only": record_prefill(model, sample.context_ids),
            }
            for label, name, options in methods:
                for budget in args.budgets:
                    kvpass.optimize(model, budget=budget, method=name, **options)
                    for mode, recording in recordings.items():
                        cache = cache_from_recording(model, recording, model.kvpass_plan)
                        ok = is_correct(tokenizer, sample, generate_new(model, sample.prompt_ids, cache))
                        hits[(length, label, budget, mode)] = hits.get((length, label, budget, mode), 0) + ok
            print(f"  {length} tokens: sample {index + 1}/{args.samples} "
                  f"({sample.prompt_ids.shape[-1]} tokens, depth {sample.depth:.2f}) "
                  f"{time.perf_counter() - started:.0f}s", flush=True)

        print_table(args, methods, hits, full_hits, [length])
    if len(args.lengths) > 1:
        print_table(args, methods, hits, full_hits, args.lengths)
    run_speed(args, model, tokenizer)


def print_table(args, methods, hits, full_hits, lengths) -> None:
    print(f"\nPasskey accuracy (%), SmolLM2-135M-Instruct, {args.samples} samples per length", flush=True)
    header = "| method | budget | " + " | ".join(f"{m} {n}" for m in MODES for n in lengths) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    print("| full cache | 1.0 | " + " | ".join(
        f"{100 * full_hits[n] / args.samples:.0f}" for _ in MODES for n in lengths) + " |")
    for label, _, _ in methods:
        for budget in args.budgets:
            cells = [f"{100 * hits[(n, label, budget, m)] / args.samples:.0f}" for m in MODES for n in lengths]
            print(f"| {label} | {budget} | " + " | ".join(cells) + " |", flush=True)


def run_speed(args, model, tokenizer) -> None:
    """Decode speed and peak KV bytes, full vs budget 0.5 evicting every step and every 16 steps."""
    if args.skip_speed:
        return
    length = max(args.lengths)
    kvpass.optimize(model, budget=1.0)
    full_speed, full_bytes = decode_speed(model, tokenizer, length)
    print(f"\nDecode after a {length}-token prompt, 64 steps, CPU (same run):")
    print(f"  full cache                : {full_speed:.1f} tok/s, peak KV {full_bytes / 2**20:.1f} MiB")
    for evict_every in (1, 16):
        kvpass.optimize(model, budget=0.5, evict_every=evict_every)
        speed, held = decode_speed(model, tokenizer, length)
        print(f"  budget 0.5, evict_every={evict_every:<2} : {speed:.1f} tok/s, peak KV {held / 2**20:.1f} MiB "
              f"-> speed x{speed / full_speed:.2f}, KV bytes x{held / full_bytes:.3f}")


if __name__ == "__main__":
    main()
