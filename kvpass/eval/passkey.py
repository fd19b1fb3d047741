"""Passkey retrieval, with the protocol of DESIGN.md (the one kvpress's figures use).

A 5-digit key hides at a random depth in repeated filler; the model must repeat it.
Two evaluation modes:

* query-aware: the whole prompt (context + question) is prefilled, then evicted, as
  `generate` does;
* context-only: the context is prefilled and evicted *before* the question arrives,
  as kvpress measures and as multi-turn reuse of a cache needs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

INSTRUCTION = (
    "A pass key is hidden inside a lot of irrelevant text. Find the pass key and memorize it. "
    "I will ask you what the pass key is.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the 5-digit number."
ANSWER_PREFIX = "The pass key is"


@dataclass
class PasskeySample:
    """One prompt split where the question starts, and the key to find."""

    key: str
    depth: float
    context_ids: torch.Tensor
    """[1, Lc] tokens up to (not including) the question."""
    question_ids: torch.Tensor
    """[1, Lq] the question, the end of the user turn and the assistant's answer prefix."""

    @property
    def prompt_ids(self) -> torch.Tensor:
        return torch.cat([self.context_ids, self.question_ids], dim=-1)


def make_sample(tokenizer, target_tokens: int, rng: random.Random) -> PasskeySample:
    """A chat-formatted passkey prompt of about `target_tokens` tokens."""
    key = f"{rng.randint(10000, 99999)}"
    depth = rng.uniform(0.1, 0.9)
    filler_tokens = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    repeats = max(2, (target_tokens - 120) // filler_tokens)
    before = round(repeats * depth)
    haystack = FILLER * before + NEEDLE.format(key=key) + FILLER * (repeats - before)
    marker = "\x00QUESTION\x00"
    messages = [{"role": "user", "content": INSTRUCTION + haystack + marker}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + ANSWER_PREFIX
    context_text, question_text = text.split(marker)
    context = tokenizer(context_text, add_special_tokens=False, return_tensors="pt").input_ids
    question = tokenizer(QUESTION + question_text, add_special_tokens=False, return_tensors="pt").input_ids
    return PasskeySample(key, depth, context, question)


def is_correct(tokenizer, sample: PasskeySample, new_tokens: torch.Tensor) -> bool:
    """Correct when the 5 digits appear in the generated text."""
    return sample.key in tokenizer.decode(new_tokens, skip_special_tokens=True)
