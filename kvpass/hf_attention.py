"""The seam kvpass uses to see every attention call of a Hugging Face model.

transformers calls each attention module's function through `AttentionInterface`, looked up
by `config._attn_implementation`. Registering a function under a name and pointing the
model's configs at it routes every call through that function without touching the
modules: calibration and sweeps use it to observe attention, the runtime to rewrite it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask


def register(name: str, function: Callable) -> None:
    """Make `function` available as attention implementation `name` (with SDPA-style masks)."""
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def set_attn_implementation(model: torch.nn.Module, implementation: str) -> str:
    """Point every config inside `model` at `implementation`; returns the previous one."""
    previous = model.config._attn_implementation
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = implementation
    return previous


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str, function: Callable) -> Iterator[None]:
    """Run `model` with `function` as its attention implementation (registered as `name`),
    restoring the previous implementation afterwards.

    Example:
        >>> with attention_implementation(model, "recorder", record):   # doctest: +SKIP
        ...     model(input_ids)
    """
    register(name, function)
    previous = set_attn_implementation(model, name)
    try:
        yield
    finally:
        set_attn_implementation(model, previous)
