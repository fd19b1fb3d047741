"""`kvpass export MODEL OUT.onnx --budget 0.5`: a pruned ONNX decode step, ready for `kvpass serve-onnx`.

A torch MODEL is optimized in torch first (so structural transforms such as PruneHeads give a
smaller graph), then exported; an ONNX MODEL is rewritten as it is. MODEL's tokenizer is saved
beside OUT as `OUT-stem.tokenizer/`, where `serve-onnx` looks for it.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

import kvpass
from kvpass.cli.models import add_loading_arguments, load_torch, model_argument
from kvpass.cli.pruning import add_pruning_arguments, budget_and_plan, transforms_from
from kvpass.cli.ui import UI, size, table

NAME = "export"
HELP = "export MODEL as a pruned ONNX model (onnxruntime serves it: kvpass serve-onnx)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", type=model_argument,
                        help="Hugging Face model directory, .gguf file, .onnx file, or smollm2")
    parser.add_argument("out", metavar="OUT.onnx", type=Path, help="where to write the pruned ONNX model")
    add_pruning_arguments(parser, plan_file=True,
                          allocation_help="how the budget is spread over sites (default uniform; adaptive calibrates "
                                          "the torch model)")
    parser.add_argument("--opset", type=int, default=23, help="ONNX opset of a torch export (default 23)")
    add_loading_arguments(parser)


def tokenizer_dir(onnx_path: Path) -> Path:
    """Where `export` saves the tokenizer of the model it wrote to `onnx_path`."""
    return onnx_path.with_name(onnx_path.stem + ".tokenizer")


def run(args: argparse.Namespace, ui: UI) -> dict[str, Any]:
    from kvpass.onnx import SERVING_EVICT_EVERY

    budget, plan = budget_and_plan(args)
    if args.out.suffix.lower() != ".onnx":
        raise ValueError(f"OUT: {str(args.out)!r} should end in .onnx")
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"OUT: no such directory {str(args.out.parent)!r}")
    options = {"plan": plan} if plan is not None else {
        "budget": budget, "transforms": transforms_from(args, default_allocation="uniform",
                                                        default_evict_every=SERVING_EVICT_EVERY)}
    if args.model.kind == "onnx":
        import onnx

        from kvpass.onnx import optimize as optimize_onnx

        with ui.stage(f"rewriting {args.model.path.name}"):
            onnx.save(optimize_onnx(args.model.path, **options), args.out)
        source_tokenizer = tokenizer_dir(args.model.path)
        if source_tokenizer.is_dir():
            shutil.copytree(source_tokenizer, tokenizer_dir(args.out), dirs_exist_ok=True)
        tokenizer_saved = source_tokenizer.is_dir()
    else:
        with ui.stage(f"loading {args.model.text}"):
            model, tokenizer = load_torch(args.model, args.dtype, args.device)
        with ui.stage("optimizing in torch"):
            model = kvpass.optimize(copy.deepcopy(model), tokenizer=tokenizer, **options)
        with ui.stage("exporting to ONNX and rewriting the graph"):
            kvpass.export_onnx(model, args.out, opset=args.opset)
        if tokenizer is not None:
            tokenizer.save_pretrained(tokenizer_dir(args.out))
        tokenizer_saved = tokenizer is not None
    return {"model": args.model.text, "out": str(args.out), "bytes": args.out.stat().st_size,
            "tokenizer": str(tokenizer_dir(args.out)) if tokenizer_saved else None, "kvpass": _metadata(args.out)}


def _metadata(path: Path) -> dict[str, Any]:
    """What the ONNX file tells its Generator: the method, and per site its I/O names and schedule."""
    import json

    import onnx

    from kvpass.rewrites.onnx import METADATA_KEY

    proto = onnx.load(path, load_external_data=False)
    return json.loads({p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY, "{}"))


def render(console: Console, result: dict[str, Any]) -> None:
    rows = [[site["layer"], site["name"], f"{site['schedule']['fraction']:.3f}", site["kv_heads"], site["head_dim"]]
            for site in result["kvpass"]["sites"]]
    console.print(table(f"wrote {result['out']} ({size(result['bytes'])})",
                        ["layer", "site", "budget", "KV heads", "head dim"], rows,
                        right={"layer", "budget", "KV heads", "head dim"}))
    if result["tokenizer"]:
        console.print(f"tokenizer saved to {result['tokenizer']}")
    console.print(f"serve it: kvpass serve-onnx {result['out']} --prompt-file PROMPT.txt")
