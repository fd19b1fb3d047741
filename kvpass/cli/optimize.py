"""`kvpass optimize MODEL --budget 0.5 --prompt-file F`: the full and the pruned model side by side."""

from __future__ import annotations

import argparse
import copy
from typing import Any

from rich.console import Console

import kvpass
from kvpass.cli.generation import generate_torch, matching_prefix
from kvpass.cli.models import add_loading_arguments, load_torch, model_argument
from kvpass.cli.prompts import add_prompt_arguments, prompt_ids
from kvpass.cli.pruning import add_pruning_arguments, budget_and_plan, transforms_from
from kvpass.cli.ui import UI, size, table

NAME = "optimize"
HELP = "generate with the full and the pruned model side by side, with the KV bytes each holds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", type=model_argument,
                        help="Hugging Face model directory, .gguf file, or smollm2")
    add_pruning_arguments(parser, plan_file=True, allocation_help="how the budget is spread over sites "
                                                                  "(default uniform; adaptive calibrates first)")
    add_prompt_arguments(parser)
    add_loading_arguments(parser)


def run(args: argparse.Namespace, ui: UI) -> dict[str, Any]:
    budget, plan = budget_and_plan(args)
    transforms = None if plan is not None else transforms_from(args, default_allocation="uniform")
    with ui.stage(f"loading {args.model.text}"):
        model, tokenizer = load_torch(args.model, args.dtype, args.device)
    ids = prompt_ids(args, tokenizer)
    with ui.stage("optimizing"):
        options = {"plan": plan} if plan is not None else {"budget": budget, "transforms": transforms}
        pruned_model = kvpass.optimize(copy.deepcopy(model), tokenizer=tokenizer, **options)
    full = generate_torch(ui, "full cache", model, tokenizer, ids, args.max_new_tokens)
    pruned = generate_torch(ui, "pruned cache", pruned_model, tokenizer, ids, args.max_new_tokens)
    applied = pruned_model.kvpass_plan
    return {
        "model": args.model.text, "budget": applied.requested, "transforms": applied.transforms,
        "prompt_tokens": ids.shape[-1], "full": full, "pruned": pruned,
        "kv_ratio": pruned["kv_bytes"] / full["kv_bytes"],
        "matching_tokens": matching_prefix(full["tokens"], pruned["tokens"]),
        "stats": kvpass.stats(pruned_model),
    }


def render(console: Console, result: dict[str, Any]) -> None:
    full, pruned = result["full"], result["pruned"]
    transforms = ", ".join(record["name"] for record in result["transforms"])
    rows = [
        ["KV cache after generation", size(full["kv_bytes"]),
         f"{size(pruned['kv_bytes'])} (x{result['kv_ratio']:.3f})"],
        ["new tokens", len(full["tokens"]), len(pruned["tokens"])],
        ["tokens/s", f"{full['tokens_per_second']:.1f}", f"{pruned['tokens_per_second']:.1f}"],
        ["text", full["text"], pruned["text"]],
    ]
    console.print(table(f"{result['model']}, {result['prompt_tokens']}-token prompt",
                        ["", "full cache", f"pruned: budget {result['budget']}, {transforms}"], rows))
    console.print(f"the pruned model's first {result['matching_tokens']} of {len(full['tokens'])} new tokens "
                  "match the full model's")
