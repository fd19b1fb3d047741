"""Prefill token selection on SmolLM2: ASL (adaptive layer), fixed layers, GemFilter two passes, vs Evict alone.

Every setting shares the byte budget ('N tokens': the bytes N tokens take in the full cache)
with `kvpass.Evict("snapkv")`; the peer is the unmodified model, timed on the same prompt
right before each setting's prefill (CPU, same process), so the prefill ratio compares like
with like on a shared machine. Prints accuracy per task, prefill time ratio (against the unmodified
model, and against `Evict` alone on the same kvpass runtime), KV bytes after generation, and
the distribution of chosen layers per task; writes every row to OUT.jsonl.

    python benchmarks/selection.py --threads 1 --split dev --samples 2 --length 1500 --budgets 256
    python benchmarks/selection.py --threads 1 --timing-only --length 3000 --budgets 512 --settings asl0.3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import Counter, defaultdict

import torch
from transformers import DynamicCache

import kvpass
from kvpass.eval.models import load_smollm2
from kvpass.eval.tasks import COUNTED_TASKS, encode, make_sample, score, seeds, token_counter
from kvpass.runtime.call_arguments import cache_argument


def settings(layers: int) -> dict[str, list]:
    """label -> the selection transform (None: eviction alone)."""
    quarter, third, half = layers // 4, layers // 3, layers // 2
    return {
        "evict": None,
        "asl0.3": kvpass.SelectLayer(tau=0.3),
        **{f"asl{tau}": kvpass.SelectLayer(tau=tau) for tau in (0.1, 0.2, 0.4, 0.5)},
        f"fixed{quarter}": kvpass.SelectLayer(layer=quarter),
        f"fixed{third}": kvpass.SelectLayer(layer=third),
        f"fixed{half}": kvpass.SelectLayer(layer=half),
        f"gemfilter{third}": kvpass.SelectLayer(layer=third, two_pass=True),
    }


def prefill(model, ids: torch.Tensor):
    """(logits of the last token, cache, seconds) of one prefill on a fresh cache."""
    cache = DynamicCache()
    started = time.perf_counter()
    with torch.no_grad():
        logits = model(ids, **cache_argument(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits, cache, time.perf_counter() - started


def continue_greedy(model, logits, cache, steps: int, eos: int) -> list[int]:
    """Greedy tokens after a prefill, from its cache."""
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(logits.argmax(-1))
            if token == eos:
                break
            tokens.append(token)
            logits = model(torch.tensor([[token]]), **cache_argument(model, cache), use_cache=True).logits[:, -1]
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--length", type=int, default=1500)
    parser.add_argument("--tasks", nargs="+", default=list(COUNTED_TASKS))
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512], help="budgets in tokens")
    parser.add_argument("--settings", nargs="+", help="labels to run (default: all)")
    parser.add_argument("--timing-only", action="store_true", help="prefill times only, no generation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="")
    parser.add_argument("--report", help="print the tables of an earlier run's OUT.jsonl and exit")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as handle:
            report([json.loads(line) for line in handle], args)
        return
    torch.set_num_threads(args.threads)

    base, tokenizer = load_smollm2()
    sites = kvpass.find_attention(base)
    layers = base.config.num_hidden_layers
    count_tokens = token_counter(tokenizer)
    samples = [make_sample(task, args.split, seed, args.length, count_tokens)
               for seed in seeds(args.split, args.samples) for task in args.tasks]
    eos = base.config.eos_token_id
    chosen = {label: transform for label, transform in settings(layers).items()
              if args.settings is None or label in args.settings}
    rows = []
    if not args.timing_only:
        for sample in samples:
            ids = encode(tokenizer, sample).prompt_ids
            logits, cache, _ = prefill(base, ids)
            text = tokenizer.decode(continue_greedy(base, logits, cache, sample.max_new_tokens, eos))
            rows.append({"setting": "full", "budget": None, "task": sample.task, "seed": sample.seed,
                         "tokens": ids.shape[-1], "score": score(sample, text), "prefill_ratio": 1.0,
                         "kv_bytes": kvpass.cache_bytes(cache), "layer": None, "text": text})
    for budget in args.budgets:
        for label, transform in chosen.items():
            model = copy.deepcopy(base)
            model.kvpass_sites = sites
            transforms = [kvpass.Evict("snapkv")] + ([transform] if transform is not None else [])
            kvpass.optimize(model, budget=f"{budget} tokens", transforms=transforms)
            for sample in samples:
                ids = encode(tokenizer, sample).prompt_ids
                reference = prefill(base, ids)[2]
                logits, cache, seconds = prefill(model, ids)
                figures = kvpass.stats(cache)
                row = {"setting": label, "budget": budget, "task": sample.task, "seed": sample.seed,
                       "tokens": ids.shape[-1], "prefill_ratio": seconds / reference, "kv_bytes": figures["kv_bytes"],
                       "layer": figures.get("SelectLayer", {}).get("layer")}
                if not args.timing_only:
                    text = tokenizer.decode(continue_greedy(model, logits, cache, sample.max_new_tokens, eos))
                    row.update(score=score(sample, text), kv_bytes=kvpass.stats(cache)["kv_bytes"], text=text)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "text"}), flush=True)
            del model
    report(rows, args)
    if args.out:
        with open(f"{args.out}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


def report(rows: list[dict], args) -> None:
    timing_only = args.timing_only or not any("score" in row for row in rows)  # a --timing-only run's rows
    groups = defaultdict(list)
    for row in rows:
        groups[(row["setting"], row["budget"])].append(row)
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    evict = {(row["budget"], row["task"], row["seed"]): row["prefill_ratio"] for row in rows
             if row["setting"] == "evict"}
    print(f"\nSmolLM2-135M-Instruct, {args.split} split, {args.samples} samples per task, ~{args.length} tokens, "
          f"{args.threads} thread(s); prefill ratio: median of (setting / unmodified model) on the same prompt")
    header = "| setting | budget | " + ("" if timing_only else " | ".join(tasks) + " | mean | ") \
        + "prefill vs full | prefill vs evict | KV bytes | chosen layers |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for (setting, budget), group in groups.items():
        cells = []
        if not timing_only:
            for task in tasks:
                scores = [row["score"] for row in group if row["task"] == task]
                cells.append(f"{100 * statistics.mean(scores):.0f}" if scores else "-")
            cells.append(f"{100 * statistics.mean(row['score'] for row in group):.1f}")
        cells.append(f"{statistics.median(row['prefill_ratio'] for row in group):.2f}")
        against = [row["prefill_ratio"] / evict[(row["budget"], row["task"], row["seed"])] for row in group
                   if (row["budget"], row["task"], row["seed"]) in evict]
        cells.append(f"{statistics.median(against):.2f}" if against and budget else "-")
        cells.append(str(int(statistics.mean(row["kv_bytes"] for row in group))))
        per_task = {task: dict(Counter(row["layer"] for row in group if row["task"] == task)) for task in tasks}
        cells.append("; ".join(f"{task}: {counts}" for task, counts in per_task.items())
                     if any(row["layer"] is not None for row in group) else "-")
        print(f"| {setting} | {budget or 'full'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
