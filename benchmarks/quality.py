"""The quality suite on SmolLM2: retrieval tasks x methods x budgets x modes, perplexity, NIAH grid.

Every task (`kvpass.eval.tasks`) runs in both modes: query-aware (whole prompt prefilled,
then evicted) and context-only (context evicted before the question arrives). One prefill
per sample is shared by every (method, budget, mode) (`kvpass.eval.runner`). Prints mean
scores per task, retention against the full cache over the counted tasks, and perplexity
increase per method; writes every row to `<out>.jsonl` for plots (`kvpass.eval.plots`).

    python benchmarks/quality.py                       # smoke profile (about 10 min, 2 cores)
    python benchmarks/quality.py --full                # the complete grid (hours)
    python benchmarks/quality.py --split dev --samples 12 --methods default tova:span=4 paged
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from tqdm import tqdm

import kvpass
from kvpass.eval import plots
from kvpass.eval.models import load_smollm2
from kvpass.eval.perplexity import perplexities, windows
from kvpass.eval.report import FULL, accuracy_table, label, save_jsonl
from kvpass.eval.runner import MODES, evaluate
from kvpass.eval.settings import make_plans
from kvpass.eval.tasks import COUNTED_TASKS, TASKS, grid_seeds, make_sample, seeds, token_counter

PROFILES = {
    "smoke": dict(samples=2, methods=["default", "tova", "paged"], budgets=[0.5, 0.25], perplexity_windows=1,
                  niah_depths=[], niah_lengths=[]),
    "full": dict(samples=24, methods=["default", *kvpass.METHODS], budgets=[0.75, 0.5, 0.25],
                 perplexity_windows=5, niah_depths=[0.1, 0.3, 0.5, 0.7, 0.9], niah_lengths=[500, 1000, 1500, 2000]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the complete grid instead of the smoke profile")
    parser.add_argument("--split", choices=["dev", "test"], default="test")
    parser.add_argument("--samples", type=int, help="samples per task (and per NIAH grid cell)")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--length", type=int, default=1500, help="prompt tokens of the task samples")
    parser.add_argument("--methods", nargs="+", help="method specs: default, tova, tova:span=4,page_size=8, ...")
    parser.add_argument("--budgets", type=float, nargs="+")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--niah-depths", type=float, nargs="*")
    parser.add_argument("--niah-lengths", type=int, nargs="*")
    parser.add_argument("--perplexity-windows", type=int, help="1024-token held-out windows (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="", help="write rows to OUT.jsonl and plots to OUT_*.png")
    args = parser.parse_args()
    profile = PROFILES["full" if args.full else "smoke"]
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tokenizer = load_smollm2()
    model = kvpass.optimize(copy.deepcopy(base), budget=1.0)
    plans = make_plans(model, args.methods, args.budgets, tokenizer)
    count_tokens = token_counter(tokenizer)
    print(f"default method: {kvpass.get_method()}; split {args.split}; {args.samples} samples per task; "
          f"{len(plans)} settings x {len(args.modes)} modes", flush=True)

    jobs = [(task, seed, args.length, None) for seed in seeds(args.split, args.samples) for task in args.tasks]
    jobs += [("niah", seed, length, depth) for length in args.niah_lengths for depth in args.niah_depths
             for seed in grid_seeds(args.split, args.samples)]
    rows, grid_rows = [], []
    started = time.perf_counter()
    for task, seed, length, depth in tqdm(jobs, desc="samples", unit="sample"):
        sample = make_sample(task, args.split, seed, length, count_tokens, depth)
        results = evaluate(model, tokenizer, sample, plans, tuple(args.modes))
        (grid_rows if depth is not None else rows).extend(results)
    print(f"\n{len(jobs)} samples in {time.perf_counter() - started:.0f}s", flush=True)

    print(f"\nMean score (%), SmolLM2-135M-Instruct, {args.split} split, ~{args.length} tokens")
    print(accuracy_table(rows, args.modes, args.tasks, COUNTED_TASKS), flush=True)
    if grid_rows:
        print_grid(grid_rows, args)
    if args.perplexity_windows:
        print_perplexity(model, tokenizer, plans, args)
    if args.out:
        save_jsonl(rows + grid_rows, f"{args.out}.jsonl")
        plots.accuracy_vs_budget(rows, f"{args.out}_accuracy.png", COUNTED_TASKS)
        pyramid = kvpass.plan(model, budget=0.5, allocation="pyramid")
        plots.plan_budgets(pyramid, f"{args.out}_plan_pyramid.png", "budget 0.5, pyramid allocation: KV kept per layer")
        if grid_rows:
            for setting in (FULL, label("default", min(args.budgets))):
                plots.niah_heatmap(grid_rows, setting, args.modes[-1], f"{args.out}_niah_{setting}.png")


def print_grid(grid_rows, args) -> None:
    """NIAH accuracy per depth x length, one block per setting, last mode."""
    mode = args.modes[-1]
    print(f"\nNIAH grid (% correct, {mode}), depth x prompt length, {args.samples} samples per cell")
    for setting in sorted({r.setting for r in grid_rows}):
        print(f"{setting}:")
        print("| depth | " + " | ".join(str(n) for n in args.niah_lengths) + " |")
        print("|" + "---|" * (len(args.niah_lengths) + 1))
        for depth in args.niah_depths:
            cells = []
            for seeds_length in args.niah_lengths:
                got = [r.score for r in grid_rows if r.setting == setting and r.mode == mode
                       and abs(r.depth - depth) < 1e-6 and abs(r.length - seeds_length) < 0.2 * seeds_length]
                cells.append(f"{100 * sum(got) / max(len(got), 1):.0f}")
            print(f"| {depth:g} | " + " | ".join(cells) + " |")


def print_perplexity(model, tokenizer, plans, args) -> None:
    """Perplexity of held-out text (768 tokens of context evicted, 256 read), relative to the full cache."""
    chunks = windows(tokenizer, 1024, count=args.perplexity_windows)
    started = time.perf_counter()
    values = perplexities(model, chunks, 768, plans)
    full = values[FULL]
    print(f"\nPerplexity on held-out text ({len(chunks)} windows: 768 context tokens evicted, 256 read; "
          f"{time.perf_counter() - started:.0f}s)")
    print("| setting | perplexity | increase vs full |\n|---|---|---|")
    for setting, value in values.items():
        print(f"| {setting} | {value:.2f} | {100 * (value / full - 1):+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
