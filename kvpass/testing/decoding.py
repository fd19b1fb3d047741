"""Step-by-step greedy decoding of the two kinds of model kvpass rewrites, for the kit's assertions.

* a Hugging Face causal LM: the model owns a `DynamicCache` (what `generate` uses);
* a model that carries its own cache tensors, `forward(input_ids, position_ids, *cache) ->
  (logits, *cache)` with the cache returned in the structure it came in (what
  `kvpass.optimize(model, example_inputs=...)` rewrites): decoding starts from the example inputs.

Both are fed the same tokens one call at a time, so the kit can look at the cache after every step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from kvpass.runtime.call_arguments import cache_argument
from kvpass.memory import cache_bytes


def is_hf_causal_lm(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return hasattr(model, "generate") and hasattr(config, "_attn_implementation")


def optimized_copy(model: torch.nn.Module, budget: Any, example_inputs: tuple | None = None,
                   **optimize_options: Any) -> torch.nn.Module:
    """`kvpass.optimize` of a deep copy: the caller's model is never changed."""
    import kvpass

    return kvpass.optimize(copy.deepcopy(model), budget=budget, example_inputs=example_inputs, **optimize_options)


def distinct_prompt(model: torch.nn.Module, length: int, seed: int = 0) -> torch.Tensor:
    """[1, length] token ids, distinct while the vocabulary allows (a repeated token's keys tie exactly
    under RoPE, and ties are broken by float noise, differently in two runtimes)."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    generator = torch.Generator().manual_seed(seed)
    if length < vocab:
        return (torch.randperm(vocab - 1, generator=generator)[:length] + 1)[None]
    return torch.randint(1, vocab, (1, length), generator=generator)


@dataclass
class Decoder:
    """One model decoding one batch: `feed` appends tokens and returns their logits."""

    model: torch.nn.Module
    cache: Any
    """A transformers Cache, or the tuple of cache tensors an explicit-cache model returned last."""
    seen: int = 0
    explicit: bool = False

    @classmethod
    def start(cls, model: torch.nn.Module, example_inputs: tuple | None) -> tuple["Decoder", torch.Tensor]:
        """A decoder at the start of decoding, and the first ids to feed it (from `example_inputs`
        for an explicit-cache model; the caller's prompt for a Hugging Face one)."""
        if example_inputs is None:
            from transformers import DynamicCache

            return cls(model, DynamicCache(config=model.config)), None
        if len(example_inputs) < 3:
            raise TypeError("example_inputs must be (input_ids, position_ids, *cache) for a model that carries its "
                            "own cache tensors")
        ids, positions, *past = example_inputs
        return cls(model, tuple(past), seen=int(positions.reshape(-1)[0]), explicit=True), ids

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, vocab] of `ids` [B, L] appended after what was fed so far."""
        with torch.no_grad():
            if self.explicit:
                positions = torch.arange(self.seen, self.seen + ids.shape[1], device=ids.device).expand(ids.shape)
                logits, *cache = self.model(ids, positions, *self.cache)
                self.cache = tuple(cache)
            else:
                logits = self.model(ids, **cache_argument(self.model, self.cache), use_cache=True).logits
        self.seen += ids.shape[1]
        return logits

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache physically holds (`kvpass.cache_bytes`)."""
        return cache_bytes(self.cache)


def greedy(decoder: Decoder, ids: torch.Tensor, steps: int, after_each=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Feed `ids`, then `steps` greedy tokens; returns the tokens [B, steps] and the logits of every call's last
    position (steps + 1 of them). `after_each(call_index)` runs after every call (0: the prompt)."""
    logits = [decoder.feed(ids)[:, -1]]
    tokens = []
    if after_each is not None:
        after_each(0)
    for step in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        tokens.append(token)
        logits.append(decoder.feed(token)[:, -1])
        if after_each is not None:
            after_each(step + 1)
    return torch.cat(tokens, dim=1) if tokens else ids[:, :0], logits


def teacher_forced(decoder: Decoder, ids: torch.Tensor, tokens: torch.Tensor, after_each=None) -> list[torch.Tensor]:
    """Feed `ids`, then `tokens` one at a time (another model's choices); returns each call's last logits."""
    logits = [decoder.feed(ids)[:, -1]]
    if after_each is not None:
        after_each(0)
    for step in range(tokens.shape[1]):
        logits.append(decoder.feed(tokens[:, step:step + 1])[:, -1])
        if after_each is not None:
            after_each(step + 1)
    return logits
