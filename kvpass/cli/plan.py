"""`kvpass plan MODEL --budget 0.5`: the per-site budgets every transform decided, and the bytes they predict."""

from __future__ import annotations

import argparse
from pathlib import Path
from dataclasses import asdict
from typing import Any

from rich.console import Console

import kvpass
from kvpass.cli.models import add_loading_arguments, load_torch, model_argument
from kvpass.cli.pruning import add_pruning_arguments, budget_and_plan, transforms_from
from kvpass.cli.ui import UI, size, table
from kvpass.methods import METHODS
from kvpass.planning import Plan

NAME = "plan"
HELP = "plan MODEL's KV budget per attention site (calibrated), with predicted bytes; -o saves it"
DEFAULT_LENGTHS = (1024, 4096, 16384)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", type=model_argument,
                        help="Hugging Face model directory, .gguf file, .onnx file, or smollm2")
    add_pruning_arguments(parser, plan_file=False,
                          allocation_help="how the budget is spread over sites (default: adaptive, from a "
                                          "calibration run; uniform for an ONNX file)")
    parser.add_argument("--calibration-file", type=Path, metavar="TEXT",
                        help="calibration prompts, separated by blank lines (default: kvpass's built-in prompts)")
    parser.add_argument("--seq-len", type=int, help="length absolute budgets are spread at (default: the context "
                                                    "length in the model's config)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), metavar="N",
                        help=f"sequence lengths to predict bytes at (default {' '.join(map(str, DEFAULT_LENGTHS))})")
    parser.add_argument("-o", "--output", type=Path, metavar="PLAN.json",
                        help="save the plan (for optimize/export --plan)")
    add_loading_arguments(parser)


def run(args: argparse.Namespace, ui: UI) -> dict[str, Any]:
    budget, _ = budget_and_plan(args)
    if args.model.kind == "onnx":
        from kvpass.onnx import plan as plan_onnx

        if args.calibration_file is not None:
            raise ValueError("--calibration-file: an ONNX graph cannot be calibrated; plan the torch model instead")
        transforms = transforms_from(args, default_allocation="uniform")
        with ui.stage(f"planning {args.model.path.name}"):
            plan = plan_onnx(args.model.path, budget, transforms=transforms)
    else:
        transforms = transforms_from(args, default_allocation="adaptive")
        prompts = calibration_prompts(args.calibration_file)
        with ui.stage(f"loading {args.model.text}"):
            model, tokenizer = load_torch(args.model, args.dtype, args.device)
        with ui.stage("finding attention, calibrating and planning"):
            plan = kvpass.plan(model, budget, transforms=transforms, calibration=prompts, tokenizer=tokenizer,
                               seq_len=args.seq_len)
    if args.output is not None:
        plan.save(args.output)
    return {"model": args.model.text, "saved_to": str(args.output) if args.output else None,
            "lengths": predicted_bytes(plan, args.lengths), "table": plan.table_rows(args.lengths[-1]),
            "plan": plan.to_dict()}


def calibration_prompts(path: Path | None) -> list[str] | None:
    """The prompts of a calibration file (blank-line separated), or None for kvpass's own."""
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"--calibration-file: no such file {str(path)!r}")
    prompts = [block.strip() for block in path.read_text().split("\n\n") if block.strip()]
    if not prompts:
        raise ValueError(f"--calibration-file: {str(path)!r} holds no prompt")
    return prompts


def predicted_bytes(plan: Plan, lengths: list[int]) -> list[dict[str, Any]]:
    """Full and planned KV bytes per sequence at each length."""
    rows = []
    for length in lengths:
        full, pruned = plan.full_kv_bytes(length), plan.kv_bytes(length)
        rows.append({"seq_len": length, "full_kv_bytes": full, "kv_bytes": pruned, "ratio": pruned / full})
    return rows


def render(console: Console, result: dict[str, Any]) -> None:
    plan = result["plan"]
    transforms = ", ".join(record["name"] for record in plan["transforms"])
    console.print(f"[bold]plan for {result['model']}[/bold]: budget {plan['requested']}, {plan['allocation']} "
                  f"allocation, transforms {transforms}, eviction {_method(plan['method'])}")
    header, *rows = result["table"]
    console.print(table("budget per attention site", header, rows, right=set(header) - {"site"}))
    rows = [[r["seq_len"], size(r["full_kv_bytes"]), size(r["kv_bytes"]), f"{r['ratio']:.3f}"]
            for r in result["lengths"]]
    console.print(table("predicted KV cache per sequence", ["tokens", "full", "planned", "ratio"], rows,
                        right={"tokens", "full", "planned", "ratio"}))
    if result["saved_to"]:
        console.print(f"saved to {result['saved_to']} (apply with: kvpass optimize MODEL --plan {result['saved_to']})")


def _method(record: dict[str, Any] | None) -> str:
    """'tova(span=2)': the method with the options that differ from its defaults."""
    if record is None:
        return "none"
    defaults = asdict(METHODS[record["name"]]()) if record["name"] in METHODS else {}
    changed = [f"{key}={value!r}" for key, value in record["options"].items() if defaults.get(key) != value]
    return f"{record['name']}({', '.join(changed)})"
