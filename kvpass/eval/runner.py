"""Score one sample under many eviction settings, both modes, from one shared prefill.

A setting is a label and a `Plan` (`kvpass.plan(model, budget, method, allocation="uniform")`);
the full cache is the plan at budget 1.0. The prompt is prefilled once
(`kvpass.eval.sweep.record_prefixes`), recording the context alone (context-only mode) and
the whole prompt but its last token (query-aware mode); every setting then evicts from
those recordings and generates greedily.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpass.runtime.call_arguments import cache_argument
from kvpass.eval.sweep import cache_from_recording, record_prefixes
from kvpass.eval.tasks import Sample, encode, score

MODES = ("query-aware", "context-only")


@dataclass(frozen=True)
class Result:
    """The score of one sample under one setting and mode, with the text that earned it."""

    task: str
    seed: int
    length: int
    """Prompt tokens."""
    depth: float
    setting: str
    mode: str
    score: float
    text: str


def generate(model, tokenizer, prompt_ids: torch.Tensor, cache, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt_ids` [1, L] from `cache` (which holds a prefix of it), as text."""
    with torch.no_grad():
        out = model.generate(prompt_ids, **cache_argument(model, cache), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
    return tokenizer.decode(out[0, prompt_ids.shape[-1]:], skip_special_tokens=True)


def evaluate(model, tokenizer, sample: Sample, plans: dict, modes: tuple[str, ...] = MODES) -> list[Result]:
    """Results of `sample` for every (label -> plan) in `plans` and every mode in `modes`.

    `model` is a kvpass-optimized model (any plan); `plans` maps a label to a `Plan` for that
    model. A plan that keeps everything (every budget 1.0: the full cache) is scored once and
    reported under every mode, since nothing is evicted.

    Example:
        >>> plans = {"full": kvpass.plan(model, 1.0), "tova@0.5": kvpass.plan(model, 0.5, "tova", allocation="uniform")}  # doctest: +SKIP
        >>> [r.score for r in evaluate(model, tokenizer, sample, plans)]                 # doctest: +SKIP
        [1.0, 1.0, 1.0, 0.0]
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"modes={modes!r}: unknown {sorted(unknown)}; expected some of {MODES}")
    prompt = encode(tokenizer, sample)
    ids = prompt.prompt_ids
    cuts = {"query-aware": ids.shape[-1] - 1, "context-only": prompt.context_ids.shape[-1]}
    recordings = record_prefixes(model, ids[:, :-1], [cuts[m] for m in modes])
    results = []
    for label, plan in plans.items():
        keeps_all = all(fraction >= 1.0 for fraction in plan.budgets.values())
        for mode in modes[:1] if keeps_all else modes:
            cache = cache_from_recording(model, recordings[cuts[mode]], plan)
            text = generate(model, tokenizer, ids, cache, sample.max_new_tokens)
            value = score(sample, text)
            for reported in (modes if keeps_all else (mode,)):
                results.append(Result(sample.task, sample.seed, ids.shape[-1], sample.depth, label, reported,
                                      value, text))
    return results

