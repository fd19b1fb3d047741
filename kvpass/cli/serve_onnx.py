"""`kvpass serve-onnx OUT.onnx --prompt-file F`: greedy generation with onnxruntime over the pruned cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from kvpass.cli.export import tokenizer_dir
from kvpass.cli.generation import count_steps
from kvpass.cli.models import ModelSource, load_tokenizer, model_argument, tokenizer_argument
from kvpass.cli.prompts import add_prompt_arguments, prompt_ids
from kvpass.cli.ui import UI, size, table

NAME = "serve-onnx"
HELP = "generate with onnxruntime from an ONNX model written by kvpass export"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", type=model_argument, help="ONNX model written by kvpass export")
    add_prompt_arguments(parser)
    parser.add_argument("--tokenizer", type=tokenizer_argument, metavar="MODEL",
                        help="where the tokenizer is: a Hugging Face directory, .gguf file or smollm2 "
                             "(default: the MODEL-stem.tokenizer/ directory kvpass export wrote)")
    parser.add_argument("--provider", action="append", metavar="NAME",
                        help="onnxruntime execution provider, repeatable (default: CUDA when available, then CPU)")


def run(args: argparse.Namespace, ui: UI) -> dict[str, Any]:
    import onnxruntime as ort

    from kvpass.onnx import Generator

    if args.model.kind != "onnx":
        raise ValueError(f"MODEL.onnx: {args.model.text!r} is not an .onnx file (make one with kvpass export)")
    tokenizer = load_tokenizer(args.tokenizer or _exported_tokenizer(args.model.path))
    ids = prompt_ids(args, tokenizer)
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    with ui.stage(f"loading {args.model.path.name} into onnxruntime"):
        generator = Generator(args.model.path, providers=args.provider, session_options=options)
    with ui.stage("generating (onnxruntime)", total=args.max_new_tokens) as advance:
        count_steps(generator, advance)
        start = time.perf_counter()
        tokens = generator.generate(ids.numpy(), args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - start
    new = tokens[0, ids.shape[-1]:].tolist()
    held, full = generator.cache_bytes(), generator.full_cache_bytes()
    return {"model": args.model.text, "prompt_tokens": ids.shape[-1],
            "text": tokenizer.decode(new, skip_special_tokens=True),
            "tokens": new, "seconds": seconds, "tokens_per_second": len(new) / seconds, "kv_bytes": held,
            "full_kv_bytes": full, "kv_ratio": held / full, "providers": generator.session.get_providers()}


def _exported_tokenizer(onnx_path: Path) -> ModelSource:
    folder = tokenizer_dir(onnx_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no tokenizer beside {onnx_path.name} (expected {str(folder)!r}, written by kvpass "
                                "export); give --tokenizer MODEL")
    return ModelSource(str(folder), "hf", folder)


def render(console: Console, result: dict[str, Any]) -> None:
    held = f"{size(result['kv_bytes'])} of {size(result['full_kv_bytes'])} without eviction (x{result['kv_ratio']:.3f})"
    rows = [["KV cache after generation", held],
            ["new tokens", len(result["tokens"])], ["tokens/s", f"{result['tokens_per_second']:.1f}"],
            ["providers", ", ".join(result["providers"])], ["text", result["text"]]]
    console.print(table(f"{result['model']} on onnxruntime, {result['prompt_tokens']}-token prompt", ["", ""], rows,
                        header=False))
