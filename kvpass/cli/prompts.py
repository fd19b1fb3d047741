"""The prompt of `optimize` and `serve-onnx`: text given inline or in a file, tokenized with the model's tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", type=Path, help="text file holding the prompt")
    source.add_argument("--prompt", help="the prompt text itself")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user turn with the tokenizer's chat template (instruct models)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate (default 32)")


def positive_int(text: str) -> int:
    """argparse `type=` for counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def prompt_ids(args: argparse.Namespace, tokenizer: Any | None) -> torch.Tensor:
    """The prompt as token ids [1, L]; clear errors for a missing file, an empty prompt or no tokenizer."""
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise FileNotFoundError(f"--prompt-file: no such file {str(args.prompt_file)!r}")
        text = args.prompt_file.read_text()
    else:
        text = args.prompt
    if not text.strip():
        raise ValueError("the prompt is empty")
    if tokenizer is None:
        raise ValueError("this model comes without a tokenizer, so a text prompt cannot be encoded "
                         "(save the tokenizer into the model directory, or give --tokenizer where offered)")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return tokenizer(text, return_tensors="pt").input_ids
