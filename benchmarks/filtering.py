"""Token filtering (kvpass.FilterTokens) on SmolLM2: quality at equal KV bytes, and CPU prefill time.

Quality, at ratios 0.25 and 0.5 in the tail layers (the deeper half), for fusion 'joint'
(variance-aware), 'key', 'value' and 'random', next to the unpruned model and to
`kvpass.Evict()` at the KV bytes joint filtering holds:

* perplexity on held-out text: each window prefills `--context` tokens, then feeds the next
  `--continuation` tokens one at a time (teacher forcing, so decode-time filtering and eviction
  are both in play); "ppl" is over the continuation's predictions, "prefill ppl" over the
  context's own (eviction does not change those);
* retrieval: `kvpass.eval.tasks`' counted tasks (needle, multi-key, multi-value, variable
  tracking, extractive QA, pass key), `--samples` prompts each of ~`--retrieval-length` tokens of
  the shipped corpus' `--split` ("test" for reported figures, "dev" for choices), the whole prompt
  prefilled, then greedy decoding; the score is the share of answers found (`tasks.score`).

Speed: prefill time of the unfiltered model (transformers' SDPA), of kvpass's runtime with
nothing pruned, and of FilterTokens at each ratio, at `--lengths` tokens, interleaved, median of
`--repeats`; ratios against the unfiltered model measured in the same run.

Text: the shipped public-domain corpus (`kvpass.eval.corpus`): its "perplexity" split for
perplexity and prefill timing, its dev/test splits for the tasks' haystacks.

    python benchmarks/filtering.py --threads 1 | tee benchmarks/results/filtering.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch
from transformers import DynamicCache

import kvpass
from kvpass.eval import corpus, tasks
from kvpass.eval.models import load_smollm2
from kvpass.eval.perplexity import windows as text_windows
from kvpass.eval.runner import generate
from kvpass.runtime.call_arguments import cache_argument

FUSIONS = ("joint", "key", "value", "random")


def perplexity(model, windows: list[torch.Tensor], context: int) -> dict[str, float]:
    """Prefill and continuation perplexity over `windows`, the KV bytes held at their ends and, when
    filtering, the lowest and highest per-layer filtered fraction over prefill + continuation."""
    prefill_nll, decode_nll, count, kept, layers = 0.0, 0.0, 0, [], []
    for window in windows:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(window[:, :context], **cache_argument(model, cache), use_cache=True).logits[0].float()
            prefill_nll += torch.nn.functional.cross_entropy(logits[:-1], window[0, 1:context], reduction="mean").item()
            last = logits[-1:]
            for position in range(context, window.shape[1]):
                decode_nll += torch.nn.functional.cross_entropy(last, window[0, position:position + 1]).item()
                count += 1
                last = model(window[:, position:position + 1], **cache_argument(model, cache),
                             use_cache=True).logits[0, -1:].float()
        figures = kvpass.stats(cache) if hasattr(model, "kvpass_plan") else None
        kept.append(figures["kv_bytes"] / figures["full_kv_bytes"] if figures else 1.0)
        if figures and "FilterTokens" in figures:
            layers.append([layer["fraction"] for layer in figures["FilterTokens"]["layers"].values()])
    result = {"ppl": math.exp(decode_nll / count), "prefill_ppl": math.exp(prefill_nll / len(windows)),
              "kv_kept": statistics.mean(kept)}
    if layers:
        per_layer = [statistics.mean(values) for values in zip(*layers)]
        result["layer_fractions"] = [round(value, 4) for value in per_layer]
    return result


def task_samples(tokenizer, split: str, length: int, samples: int) -> list[tuple[tasks.Sample, torch.Tensor]]:
    """(sample, prompt ids) for `samples` seeds of `split` of every counted task."""
    count_tokens = tasks.token_counter(tokenizer)
    chosen = [tasks.make_sample(task, split, seed, length, count_tokens)
              for task in tasks.COUNTED_TASKS for seed in tasks.seeds(split, samples)]
    return [(sample, tasks.encode(tokenizer, sample).prompt_ids) for sample in chosen]


def retrieval(model, tokenizer, prompts) -> dict[str, float]:
    """Mean score per task and over all prompts ("mean"), each prompt prefilled whole then decoded greedily."""
    scores: dict[str, list[float]] = {}
    for sample, ids in prompts:
        text = generate(model, tokenizer, ids, DynamicCache(config=model.config), sample.max_new_tokens)
        scores.setdefault(sample.task, []).append(tasks.score(sample, text))
    result = {task: statistics.mean(values) for task, values in scores.items()}
    result["mean"] = statistics.mean(value for values in scores.values() for value in values)
    return result


def prefill_seconds(models: dict[str, torch.nn.Module], ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median prefill time of each model on `ids` (runs interleaved, so load changes hit all alike)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            with torch.no_grad():
                model(ids, **cache_argument(model, DynamicCache(config=model.config)), use_cache=True,
                      logits_to_keep=1)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2, help="prompts per task")
    parser.add_argument("--split", choices=("dev", "test"), default="test")
    parser.add_argument("--retrieval-length", type=int, default=1500)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recent", type=int, default=kvpass.FilterTokens.recent,
                        help="decode steps a filtered decode token stays cached (FilterTokens' recent)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_smollm2()
    results: dict[str, object] = {"args": vars(args), "text": "kvpass.eval.corpus"}

    def filtered(ratio: float, fusion: str) -> torch.nn.Module:
        return kvpass.optimize(copy.deepcopy(base), budget=1.0,
                               transforms=[kvpass.FilterTokens(ratio, fusion=fusion, recent=args.recent,
                                                                   seed=args.seed), kvpass.Evict()])

    if not args.skip_quality:
        windows = text_windows(tokenizer, args.context + args.continuation, args.windows)
        prompts = task_samples(tokenizer, args.split, args.retrieval_length, args.samples)
        print(f"perplexity: {args.windows} windows of {args.context} + {args.continuation} tokens; tasks: "
              f"{len(prompts)} {args.split} prompts of ~{statistics.mean(p.shape[-1] for _, p in prompts):.0f} "
              "tokens", flush=True)
        rows = []

        def measure(label: str, model: torch.nn.Module, ratio: float | None) -> dict[str, float]:
            start = time.perf_counter()
            row = {"config": label, "ratio": ratio, **perplexity(model, windows, args.context),
                   "retrieval": retrieval(model, tokenizer, prompts)}
            rows.append(row)
            print(json.dumps(row), f"({time.perf_counter() - start:.0f}s)", flush=True)
            return row

        measure("unpruned", base, None)
        for ratio in args.ratios:
            joint = None
            for fusion in FUSIONS:
                model = filtered(ratio, fusion)
                row = measure(f"FilterTokens({ratio}, {fusion}, recent={args.recent})", model, ratio)
                joint = joint or row
                del model
            budget = math.floor(joint["kv_kept"] * 1000) / 1000
            evict = kvpass.optimize(copy.deepcopy(base), budget=budget, transforms=[kvpass.Evict()])
            measure(f"Evict() at budget {budget} (joint's KV bytes)", evict, ratio)
            del evict
        results["quality"] = rows
        print("\n| config | KV kept | filtered per layer (min-max) | ppl | prefill ppl | retrieval |\n"
              "|---|---|---|---|---|---|")
        for row in rows:
            fractions = row.get("layer_fractions")
            filtered_share = f"{min(fractions):.3f}-{max(fractions):.3f}" if fractions else "-"
            print(f"| {row['config']} | {row['kv_kept']:.3f} | {filtered_share} | {row['ppl']:.3f} | "
                  f"{row['prefill_ppl']:.3f} | {row['retrieval']['mean']:.3f} |")

    if not args.skip_speed:
        text_ids = tokenizer(corpus.text("perplexity"), add_special_tokens=False, return_tensors="pt").input_ids
        models = {"unfiltered (transformers SDPA)": base,
                  "kvpass, nothing pruned": kvpass.optimize(copy.deepcopy(base), budget=1.0)}
        models.update({f"FilterTokens({ratio})": filtered(ratio, "joint") for ratio in args.ratios})
        speed = {}
        print(f"\nprefill seconds (median of {args.repeats}, {torch.get_num_threads()} threads), ratio to unfiltered")
        for length in args.lengths:
            seconds = prefill_seconds(models, text_ids[:, :length], args.repeats)
            speed[length] = seconds
            reference = seconds["unfiltered (transformers SDPA)"]
            print(f"{length} tokens: " + "; ".join(f"{name} {value:.2f}s ({value / reference:.3f}x)"
                                                   for name, value in seconds.items()), flush=True)
        results["speed"] = speed
    print("\nraw: " + json.dumps(results))


if __name__ == "__main__":
    main()
