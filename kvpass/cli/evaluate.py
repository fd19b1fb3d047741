"""`kvpass eval MODEL --tasks ... --budgets ... --methods ...`: the quality suite (`kvpass.eval`), with plots.

Every sample is prefilled once and shared by every (method, budget) setting and both modes
(query-aware: the whole prompt prefilled, then evicted; context-only: the context evicted
before the question arrives); scores per task, retention against the full cache over the
counted tasks, optional held-out perplexity, and with `--out` the rows (JSONL) and a plot.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown

import kvpass
from kvpass.cli.models import add_loading_arguments, load_torch, model_argument
from kvpass.cli.prompts import positive_int
from kvpass.cli.ui import UI, table
from kvpass.eval import plots
from kvpass.eval.perplexity import perplexities, windows
from kvpass.eval.report import FULL, accuracy_table, mean_scores, retention, save_jsonl
from kvpass.eval.runner import MODES, evaluate
from kvpass.eval.settings import make_plans, parse_method
from kvpass.eval.tasks import COUNTED_TASKS, TASKS, make_sample, seeds, token_counter

NAME = "eval"
HELP = "score MODEL's pruned cache on retrieval tasks against the full cache (kvpass.eval), with plots"
PERPLEXITY_WINDOW, PERPLEXITY_CONTEXT = 1024, 768
"""Held-out windows of 1024 tokens: 768 of context evicted, the next 256 read (as benchmarks/quality.py)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", type=model_argument,
                        help="instruct model (its tokenizer needs a chat template): Hugging Face directory, "
                             ".gguf file, or smollm2")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS), metavar="TASK",
                        help=f"tasks (default all: {', '.join(sorted(TASKS))}); counted toward retention: "
                             f"{', '.join(COUNTED_TASKS)}")
    parser.add_argument("--methods", nargs="+", type=method_spec, default=["default"], metavar="SPEC",
                        help="eviction methods: default, tova, tova:span=4,page_size=8, ... (default: default)")
    parser.add_argument("--budgets", nargs="+", type=fraction, default=[0.5, 0.25], metavar="FRACTION",
                        help="budgets, fractions of the full cache's bytes (default 0.5 0.25)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--samples", type=positive_int, default=2, help="samples per task (default 2)")
    parser.add_argument("--length", type=positive_int, default=1500, help="prompt tokens per sample (default 1500)")
    parser.add_argument("--split", choices=["dev", "test"], default="test",
                        help="seed split: choose settings on dev, report test (default test)")
    parser.add_argument("--perplexity-windows", type=int, default=0, metavar="N",
                        help=f"also measure perplexity on N held-out windows of {PERPLEXITY_WINDOW} tokens (default 0)")
    parser.add_argument("--out", type=Path, metavar="PREFIX",
                        help="write the rows to PREFIX.jsonl and the accuracy-vs-budget plot to PREFIX_accuracy.png")
    add_loading_arguments(parser)


def method_spec(text: str) -> str:
    try:
        parse_method(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction of the full cache in (0, 1], got {text!r}")
    return value


def run(args: argparse.Namespace, ui: UI) -> dict[str, Any]:
    if args.out is not None and not args.out.parent.is_dir():
        raise FileNotFoundError(f"--out: no such directory {str(args.out.parent)!r}")
    with ui.stage(f"loading {args.model.text}"):
        base, tokenizer = load_torch(args.model, args.dtype, args.device)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{args.model.text}: the tasks are chat prompts, so eval needs a tokenizer with a chat "
                         "template (an instruct model)")
    with ui.stage("optimizing and planning every setting"):
        model = kvpass.optimize(copy.deepcopy(base), budget=1.0)
        plans = make_plans(model, args.methods, args.budgets, tokenizer)
    count_tokens = token_counter(tokenizer)
    jobs = [(task, seed) for seed in seeds(args.split, args.samples) for task in args.tasks]
    rows = []
    with ui.stage(f"{len(jobs)} samples x {len(plans)} settings", total=len(jobs)) as advance:
        for task, seed in jobs:
            sample = make_sample(task, args.split, seed, args.length, count_tokens)
            rows.extend(evaluate(model, tokenizer, sample, plans, tuple(args.modes)))
            advance(1)
    perplexity = None
    if args.perplexity_windows:
        with ui.stage(f"perplexity on {args.perplexity_windows} held-out windows"):
            chunks = windows(tokenizer, PERPLEXITY_WINDOW, count=args.perplexity_windows)
            perplexity = perplexities(model, chunks, PERPLEXITY_CONTEXT, plans)
    counted = [task for task in COUNTED_TASKS if task in args.tasks]
    files = []
    if args.out is not None:
        save_jsonl(rows, f"{args.out}.jsonl")
        files = [f"{args.out}.jsonl", plots.accuracy_vs_budget(rows, f"{args.out}_accuracy.png", counted or args.tasks)]
    return {
        "model": args.model.text, "split": args.split, "samples": args.samples, "length": args.length,
        "settings": list(plans), "modes": args.modes, "counted_tasks": counted,
        "mean_scores": [{"task": task, "setting": setting, "mode": mode, "score": value, "samples": count}
                        for (task, setting, mode), (value, count) in sorted(mean_scores(rows).items())],
        "retention": {setting: {mode: _retention(rows, setting, mode, counted) for mode in args.modes}
                      for setting in plans if setting != FULL},
        "perplexity": perplexity, "table": accuracy_table(rows, args.modes, args.tasks, counted),
        "rows": [asdict(row) for row in rows], "files": files,
    }


def _retention(rows: list, setting: str, mode: str, counted: list[str]) -> float | None:
    """Retention over the counted tasks, or None where the full cache scored nothing to retain."""
    try:
        return retention(rows, setting, mode, counted) if counted else None
    except ValueError:
        return None


def render(console: Console, result: dict[str, Any]) -> None:
    console.print(f"[bold]{result['model']}[/bold]: {result['split']} split, {result['samples']} samples per task, "
                  f"~{result['length']} tokens")
    console.print(Markdown(result["table"]))
    if result["perplexity"]:
        full = result["perplexity"][FULL]
        rows = [[setting, f"{value:.2f}", f"{100 * (value / full - 1):+.1f}%"]
                for setting, value in result["perplexity"].items()]
        console.print(table("held-out perplexity", ["setting", "perplexity", "vs full"], rows,
                            right={"perplexity", "vs full"}))
    for path in result["files"]:
        console.print(f"wrote {path}")
