"""Counting the bytes a KV cache physically holds."""

from __future__ import annotations

from typing import Any

import torch


def cache_bytes(past_key_values: Any) -> int:
    """Bytes of storage behind every tensor of a KV cache, each storage counted once.

    Accepts a transformers `Cache` (kvpass's compacted layers included: their slot and
    statistic tensors count too), or any nesting of tuples/lists/dicts of tensors such
    as an explicit-cache model returns. A view of a larger buffer counts the whole buffer,
    so a mask or a narrow view over a full-size cache saves nothing here.

    Example:
        >>> import torch
        >>> k = torch.zeros(1, 2, 10, 4)
        >>> cache_bytes((k, k[:, :, :5]))   # the view shares k's storage
        320
    """
    storages: dict[int, int] = {}
    for tensor in _tensors(past_key_values):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
    elif hasattr(obj, "self_attention_cache"):  # transformers EncoderDecoderCache
        yield from _tensors(obj.self_attention_cache)
        yield from _tensors(obj.cross_attention_cache)
    elif hasattr(obj, "layers"):  # transformers Cache: every tensor its layers hold (K/V, recurrent states, ...)
        for layer in obj.layers:
            site_cache = getattr(layer, "site_cache", None)
            yield from _tensors(site_cache.tensors() if site_cache is not None else
                                [value for value in vars(layer).values() if isinstance(value, torch.Tensor)])
    elif obj is not None:
        raise TypeError(
            f"past_key_values must be a transformers Cache or nested tuples/lists of tensors, got {type(obj).__name__}"
        )
