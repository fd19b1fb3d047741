"""Structural head pruning on SmolLM2: importance-ranked vs random KV-head removal, same fractions, same run.

For each fraction of the 90 KV groups removed (`kvpass.PruneHeads`), compares the calibrated
ranking (`importance="output_error"`) with random choices (median of `--seeds` seeds) on:

* perplexity on the corpus's held-out split (`kvpass.eval.perplexity`; windows of 1,024 tokens);
* the retrieval tasks of the quality suite (`kvpass.eval.tasks`, test split, ~1.5K-token prompts,
  the whole prompt then greedy answers: head pruning changes the prefill itself);
* parameters and KV bytes removed, CPU prefill and decode tokens/s against the unpruned model.

Calibration (with the per-head removal errors) runs once on kvpass's built-in prompts (disjoint from
the perplexity text) and is shared by every fraction. Run:

    python benchmarks/heads.py                          # 10/25/33%, 5 random seeds, 24 samples
    python benchmarks/heads.py --fractions 0.1 --seeds 2 --samples 6 --ppl-windows 1   # quick look
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from tqdm import tqdm

import kvpass
from kvpass.calibration import calibrate
from kvpass.eval.models import load_smollm2
from kvpass.eval.perplexity import negative_log_likelihood, windows
from kvpass.eval.runner import generate
from kvpass.eval.tasks import (
    COUNTED_TASKS,
    encode,
    make_sample,
    score,
    seeds,
    token_counter,
)
from kvpass.runtime.call_arguments import cache_argument


def prune(base, fraction: float, importance: str, seed: int, calibration):
    """A head-pruned copy of `base` (no eviction: the budget the removed heads leave)."""
    if fraction == 0:
        return copy.deepcopy(base)
    return kvpass.optimize(copy.deepcopy(base), budget=1.0, calibration=calibration,
                           transforms=[kvpass.PruneHeads(fraction, importance=importance, seed=seed)])


def perplexity(model, texts: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for window in texts:
        with torch.no_grad():
            logits = model(window).logits
        total += negative_log_likelihood(logits[:, :-1], window[:, 1:])
        count += window.shape[-1] - 1
    return float(torch.tensor(total / count).exp())


def accuracy(model, tokenizer, samples) -> float:
    return statistics.fmean(score(s, generate(model, tokenizer, encode(tokenizer, s).prompt_ids, None, s.max_new_tokens))
                            for s in samples)


def speed(model, ids: torch.Tensor, steps: int = 16) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy pass over `ids`."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        start = time.perf_counter()
        token = model(ids, **cache_argument(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, **cache_argument(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start
    return ids.shape[-1] / prefill, steps / decode


def kv_bytes_per_token(model) -> int:
    plan = getattr(model, "kvpass_plan", None)
    sites = plan.sites if plan is not None else kvpass.find_attention(model)
    return sum((plan.geometry(s) if plan is not None else s).kv_bytes_per_token(4) for s in sites)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.33])
    parser.add_argument("--seeds", type=int, default=5, help="random choices per fraction (median reported)")
    parser.add_argument("--samples", type=int, default=24, help="retrieval samples, spread over the counted tasks")
    parser.add_argument("--length", type=int, default=1500)
    parser.add_argument("--split", default="test")
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tokenizer = load_smollm2()
    started = time.perf_counter()
    calibration = calibrate(base, tokenizer=tokenizer, sites=kvpass.find_attention(base), heads=True)
    print(f"calibration: {time.perf_counter() - started:.1f} s on prompts of {calibration.prompt_tokens} tokens")
    counter = token_counter(tokenizer)
    tasks = list(COUNTED_TASKS)
    samples = [make_sample(tasks[i % len(tasks)], args.split, seed, args.length, counter)
               for i, seed in enumerate(seeds(args.split, args.samples))]
    texts = windows(tokenizer, 1024, args.ppl_windows)
    probe = encode(tokenizer, samples[0]).prompt_ids

    full_params = sum(p.numel() for p in base.parameters())
    full_kv = kv_bytes_per_token(base)
    settings = [("full", 0.0, "full", 0)] + [
        (f"{kind}@{fraction}", fraction, kind, seed)
        for fraction in args.fractions
        for kind, seed in [("output_error", 0)] + [("random", s) for s in range(args.seeds)]
    ]
    rows = {}
    for label, fraction, kind, seed in tqdm(settings, desc="settings"):
        model = base if kind == "full" else prune(base, fraction, kind, seed, calibration)
        prefill, decode = speed(model, probe)
        rows[(label, seed)] = dict(
            fraction=fraction, kind=kind, ppl=perplexity(model, texts), accuracy=accuracy(model, tokenizer, samples),
            params=full_params - sum(p.numel() for p in model.parameters()), kv=1 - kv_bytes_per_token(model) / full_kv,
            prefill=prefill, decode=decode)
        row = rows[(label, seed)]
        print(f"  {label} seed {seed}: perplexity {row['ppl']:.2f}, retrieval {100 * row['accuracy']:.1f}%",
              file=sys.stderr, flush=True)  # progress; the table follows at the end
        del model

    full = rows[("full", 0)]
    print(f"\nSmolLM2-135M, {len(samples)} retrieval samples ({args.split} split, ~{args.length} tokens, tasks "
          f"{', '.join(tasks)}), perplexity on {len(texts)} x 1024 held-out tokens; random = median of {args.seeds} seeds")
    print(f"full model: perplexity {full['ppl']:.2f}, retrieval {100 * full['accuracy']:.1f}%, "
          f"prefill {full['prefill']:.0f} tok/s, decode {full['decode']:.1f} tok/s\n")
    print("| KV groups removed | ranking | perplexity | retrieval (% of full) | params removed | KV bytes saved "
          "| prefill x | decode x |")
    print("|---|---|---|---|---|---|---|---|")
    for fraction in args.fractions:
        for kind in ("output_error", "random"):
            group = [r for r in rows.values() if r["fraction"] == fraction and r["kind"] == kind]
            median = lambda key: statistics.median(r[key] for r in group)  # noqa: E731
            name = kind if kind != "random" else f"random (median of {len(group)})"
            print(f"| {fraction:.0%} | {name} | {median('ppl'):.2f} | {100 * median('accuracy') / full['accuracy']:.1f} "
                  f"| {median('params') / 1e6:.2f} M ({median('params') / full_params:.1%}) | {median('kv'):.1%} "
                  f"| {median('prefill') / full['prefill']:.2f} | {median('decode') / full['decode']:.2f} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
