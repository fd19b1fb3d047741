"""`assert_identity`: at a budget that keeps everything, kvpass changes no token and no logit."""

from __future__ import annotations

from typing import Any

import torch

from kvpass.testing.decoding import Decoder, distinct_prompt, greedy, is_hf_causal_lm, optimized_copy


def assert_identity(model: torch.nn.Module, budget: float | str = 1.0, *, steps: int = 16,
                    prompt: torch.Tensor | None = None, example_inputs: tuple | None = None, atol: float = 1e-5,
                    **optimize_options: Any) -> None:
    """Assert `kvpass.optimize(model, budget, ...)` (of a copy) generates exactly what `model` does.

    Both generate `steps` greedy tokens after the prompt (default: 32 distinct tokens) with
    `generate` (Hugging Face models), or call after call from `example_inputs` (models that carry
    their own cache): the tokens must be equal, and the logits within `atol` at every step up to
    the first differing token. `optimize_options` go to `kvpass.optimize` (`transforms=` with
    identity settings, such as `kvpass.PruneHeads(0)`, must pass too).

    Example:
        >>> assert_identity(model)                                                     # doctest: +SKIP
        >>> assert_identity(model, transforms=[kvpass.PruneHeads(0), kvpass.Evict()])  # doctest: +SKIP
    """
    optimized = optimized_copy(model, budget, example_inputs, **optimize_options)
    if example_inputs is None and prompt is None:
        prompt = distinct_prompt(model, 32)
    expected_tokens, expected = _generate(model, prompt, example_inputs, steps)
    tokens, actual = _generate(optimized, prompt, example_inputs, steps)
    differs = (tokens != expected_tokens).any(0).nonzero()
    first = int(differs[0]) if len(differs) else steps
    compared = min(first + 1, len(actual))  # the logits that chose the first differing token saw the same context
    differences = [float((a - e).abs().max()) for a, e in zip(actual[:compared], expected[:compared])]
    problems = []
    if first < steps:
        problems.append(f"greedy token {first} differs: {tokens[:, first].tolist()} instead of "
                        f"{expected_tokens[:, first].tolist()}")
    above = [step for step, difference in enumerate(differences) if difference > atol]
    if above:
        problems.append(f"logits differ by up to {max(differences):.3g} (atol {atol:g}), first at step {above[0]}")
    if problems:
        raise AssertionError(f"kvpass.optimize(budget={budget!r}) changed what {type(model).__name__} computes: "
                             + "; ".join(problems))


def _generate(model: torch.nn.Module, prompt: torch.Tensor | None, example_inputs: tuple | None,
              steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy tokens [B, steps] and the logits [B, vocab] that chose each."""
    if is_hf_causal_lm(model) and example_inputs is None:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=model.generation_config.pad_token_id or 0)
        return out.sequences[:, prompt.shape[1]:], list(out.logits)
    decoder, ids = Decoder.start(model, example_inputs)
    tokens, logits = greedy(decoder, ids, steps)
    return tokens, logits[:-1]
