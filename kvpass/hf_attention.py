"""The seam kvpass uses to see every attention call of a Hugging Face model.

transformers calls each attention module's function through `AttentionInterface`, looked up
by `config._attn_implementation`. Registering a function under a name and pointing the
model's configs at it routes every call through that function without touching the
modules: calibration and sweeps use it to observe attention, the runtime to rewrite it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask


REGISTERED: set[str] = set()
"""Attention implementations registered through `register` (kvpass's runtime, calibration, oracles)."""

_EAGER_MASKS: dict[int, weakref.ref] = {}
"""id(config) -> config, for the models `use_eager_masks` marked."""


def register(name: str, function: Callable, masks: Callable | None = None) -> None:
    """Make `function` available as attention implementation `name`, with the masks of `masks` (a transformers
    mask function; default: SDPA-style, or eager for the models marked by `use_eager_masks`)."""
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, masks or _mask)
    REGISTERED.add(name)


def use_eager_masks(configs: Iterable[Any], enabled: bool = True) -> None:
    """Under kvpass's implementations, models with these configs get eager (additive float) masks rather than
    SDPA-style ones: their modules compute attention themselves and add the mask to their logits."""
    for config in configs:
        if enabled:
            _EAGER_MASKS[id(config)] = weakref.ref(config)
        else:
            _EAGER_MASKS.pop(id(config), None)


def uses_eager_masks(config: Any) -> bool:
    reference = _EAGER_MASKS.get(id(config))
    return reference is not None and reference() is config


def _mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    masks = eager_mask if uses_eager_masks(config) else sdpa_mask
    return masks(*args, config=config, **kwargs)


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


def cache_windows(model: torch.nn.Module) -> dict[int, int]:
    """Layer index -> past tokens the model's own cache keeps, for its sliding-window and chunked
    layers (read the way transformers builds the cache: `get_layer_types_and_kwargs`).

    A config with a `sliding_window` value whose layers are all full attention has none.
    """
    text = model.config.get_text_config(decoder=True)
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
    except Exception:  # noqa: BLE001 - configs the cache cannot be built from have no windows to read
        return {}
    return {index: kwargs["sliding_window"] - 1 for index, kwargs in enumerate(layer_kwargs)
            if isinstance(kwargs.get("sliding_window"), int) and kwargs["sliding_window"] > 0}


def annotate_windows(model: torch.nn.Module, sites: list) -> None:
    """Set each site's `window` from the cache layer of its module's `layer_idx`."""
    windows = cache_windows(model)
    if not windows:
        return
    modules = dict(model.named_modules())
    for site in sites:
        site.window = windows.get(getattr(modules.get(site.name), "layer_idx", None))
