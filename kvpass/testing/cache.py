"""`assert_cache_within`: the byte cap holds after the prompt and at every decoding step."""

from __future__ import annotations

from typing import Any

import torch

from kvpass.budget import parse_budget
from kvpass.stats import stats
from kvpass.testing.decoding import Decoder, distinct_prompt, greedy, optimized_copy, teacher_forced


def assert_cache_within(model: torch.nn.Module, budget: float | str, prompt_len: int = 64, steps: int = 16, *,
                        prompt: torch.Tensor | None = None, example_inputs: tuple | None = None,
                        **optimize_options: Any) -> None:
    """Assert the cache of `kvpass.optimize(model, budget, ...)` (of a copy) never holds more than `budget`.

    A prompt of `prompt_len` distinct tokens (or `prompt`; an explicit-cache model starts from
    `example_inputs`) and `steps` greedy tokens go through the optimized model and, fed the same
    tokens, through `model` itself. After every call the bytes the optimized cache physically holds
    (`kvpass.cache_bytes`: K, V and every slot and statistic tensor) must be within the budget of
    what the unmodified model's cache holds then: `budget` x its bytes for a fraction, the bytes
    that many of its tokens take for `'N tokens'`, the size itself for `'512MB'` (per sequence).

    Example:
        >>> assert_cache_within(model, budget=0.25, prompt_len=200, steps=32, method="h2o")  # doctest: +SKIP
    """
    cap = parse_budget(budget)
    optimized = optimized_copy(model, cap, example_inputs, **optimize_options)
    pruned, ids = Decoder.start(optimized, example_inputs)
    ids = ids if ids is not None else (prompt if prompt is not None else distinct_prompt(model, prompt_len))
    full, _ = Decoder.start(model, example_inputs)
    held: list[tuple[int, str]] = []
    tokens, _ = greedy(pruned, ids, steps, after_each=lambda call: held.append((pruned.cache_bytes,
                                                                                 _layers(pruned.cache))))

    def check(call: int) -> None:
        reference, batch = full.cache_bytes, ids.shape[0]
        limit = {"fraction": lambda: cap.value * reference,
                 "tokens": lambda: cap.value * reference / full.seen,
                 "bytes": lambda: cap.value * batch}[cap.kind]()
        size, layers = held[call]
        if size > limit:
            raise AssertionError(
                f"KV cache over budget {cap.text} after call {call} of {steps + 1} (0: the {ids.shape[1]}-token "
                f"prompt; {full.seen} tokens seen): it holds {size:,} bytes, the cap is {int(limit):,} (the "
                f"unmodified cache holds {reference:,}). The optimized cache then: {layers}")

    teacher_forced(full, ids, tokens, after_each=check)


def _layers(cache: Any) -> str:
    """Per site: tokens held and bytes (a transformers Cache), or the tensors' shapes (explicit caches)."""
    if hasattr(cache, "layers"):
        return "; ".join(f"{name}: {site['tokens_held']} tokens, {site['kv_bytes']:,} bytes"
                         for name, site in stats(cache)["sites"].items())
    leaves = torch.utils._pytree.tree_leaves(cache)
    return "; ".join(f"{tuple(t.shape)}" for t in leaves if isinstance(t, torch.Tensor))
