"""Greedy generation with a progress bar, for `optimize` (torch) and `serve-onnx` (onnxruntime)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from kvpass.runtime.call_arguments import cache_argument
from kvpass.cli.ui import UI


def generate_torch(ui: UI, label: str, model: torch.nn.Module, tokenizer: Any, ids: torch.Tensor,
                   max_new_tokens: int) -> dict[str, Any]:
    """Greedy `generate` over a fresh cache: the new tokens, their text, the KV bytes held at the end, the time."""
    from transformers import DynamicCache
    from transformers.generation.streamers import BaseStreamer

    import kvpass

    class Progress(BaseStreamer):
        """Advances the bar once per generated token (the first `put` is the prompt)."""

        def __init__(self, advance: Callable[[int], None]):
            self.advance, self.prompt_seen = advance, False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.advance(1)
            self.prompt_seen = True

        def end(self) -> None:
            pass

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    with ui.stage(f"generating ({label})", total=max_new_tokens) as advance, torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids.to(device), **cache_argument(model, cache), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=_pad_token(model, tokenizer), streamer=Progress(advance))
        seconds = time.perf_counter() - start
    new = out[0, ids.shape[-1]:].tolist()
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": new,
            "kv_bytes": kvpass.cache_bytes(cache), "seconds": seconds, "tokens_per_second": len(new) / seconds}


def count_steps(generator: Any, advance: Callable[[int], None]) -> None:
    """Make an onnxruntime `kvpass.onnx.Generator` advance a progress bar once per step it runs
    (the first step is the prompt's prefill)."""
    step = generator.step

    def counted(input_ids, attention_mask=None):
        logits = step(input_ids, attention_mask)
        advance(1)
        return logits

    generator.step = counted


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def _pad_token(model: torch.nn.Module, tokenizer: Any) -> int | None:
    config = model.generation_config
    for candidate in (config.pad_token_id, getattr(tokenizer, "pad_token_id", None), config.eos_token_id,
                      getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return candidate
    return None
