"""`kvpass find MODEL`: every attention site kvpass finds in the graph, and what it cannot rewrite."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

import kvpass
from kvpass.cli.models import add_loading_arguments, load_torch, model_argument
from kvpass.cli.ui import UI, table
from kvpass.site import SiteReport

NAME = "find"
HELP = "list MODEL's attention sites (heads, KV heads, head dim, causal/cross) and what is unsupported"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", type=model_argument,
                        help="Hugging Face model directory, .gguf file, .onnx file, or smollm2")
    add_loading_arguments(parser)


def run(args: argparse.Namespace, ui: UI) -> dict[str, Any]:
    report = find_sites(args, ui)
    return {
        "model": args.model.text,
        "capture": report.capture,
        "capture_note": report.capture_note,
        "sites": [site.to_dict() for site in report],
        "unsupported": [{"name": u.name, "pattern": u.pattern, "reason": u.reason} for u in report.unsupported],
    }


def find_sites(args: argparse.Namespace, ui: UI) -> SiteReport:
    """The sites of MODEL: an ONNX graph is read as it is, a torch model captured with torch.export."""
    if args.model.kind == "onnx":
        from kvpass.onnx import find_attention as find_onnx_attention

        with ui.stage(f"reading {args.model.path.name}"):
            return find_onnx_attention(args.model.path)
    with ui.stage(f"loading {args.model.text}"):
        model, _ = load_torch(args.model, args.dtype, args.device)
    with ui.stage("capturing the graph and matching attention"):
        return kvpass.find_attention(model)


def render(console: Console, result: dict[str, Any]) -> None:
    sites = result["sites"]
    rows = [[s["layer"], s["name"], s["pattern"], s["num_heads"], s["num_kv_heads"], s["head_dim"],
             _kind(s), "yes" if s["reads_cache"] else "no", "found" if s["projections"] else "-"] for s in sites]
    columns = ["layer", "module", "pattern", "heads", "KV heads", "head dim", "attention", "reads cache", "Q/K/V/O"]
    console.print(table(f"{len(sites)} attention sites in {result['model']} (via {result['capture']})", columns, rows,
                        right={"layer", "heads", "KV heads", "head dim"}))
    if result["capture_note"]:
        console.print(f"capture note: {result['capture_note']}")
    if result["unsupported"]:
        console.print(table("unsupported: kvpass refuses to prune this model until these are understood",
                            ["module", "pattern", "reason"],
                            [[u["name"], u["pattern"], u["reason"]] for u in result["unsupported"]]))
    else:
        console.print("unsupported: none")


def _kind(site: dict[str, Any]) -> str:
    kind = "cross" if site["cross"] else "causal self" if site["causal"] else "bidirectional self"
    return kind + (", masked" if site["masked"] else "")
