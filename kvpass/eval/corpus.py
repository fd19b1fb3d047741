"""The shipped public-domain corpus: varied, non-repeating prose for haystacks and perplexity.

A filler sentence repeated hundreds of times lets almost any eviction method keep a
hidden fact (everything else looks alike); real prose does not. One book (Botchan, 1919
translation; see `kvpass/eval/data/README.md`) is split three ways, so that method choices
made on the development split never see the text of the reported test split.

Example:
    >>> from kvpass.eval.corpus import sentences
    >>> len(sentences("dev")) > 1000, sentences("test")[0][:21]
    (True, 'I will give him back ')
"""

from __future__ import annotations

import random
from functools import lru_cache
from importlib import resources
from typing import Callable

SPLITS = ("dev", "test", "perplexity")
"""dev: haystacks for choices; test: haystacks for reported figures; perplexity: held-out text."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a corpus split; expected one of {SPLITS}")


@lru_cache(maxsize=None)
def sentences(split: str) -> tuple[str, ...]:
    """The sentences of one split, in the book's order (no line is shared between splits)."""
    _check_split(split)
    text = resources.files("kvpass.eval").joinpath("data", f"botchan_{split}.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def text(split: str) -> str:
    """One split as running text (sentences joined by spaces)."""
    return " ".join(sentences(split))


def passage(split: str, tokens: int, rng: random.Random, count_tokens: Callable[[str], int]) -> list[str]:
    """Consecutive sentences of `split`, from a random start, adding up to about `tokens` tokens.

    `count_tokens` measures one sentence (with its leading space), e.g.
    `lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)`. The passage stops at
    the first sentence that reaches `tokens`, and never repeats a sentence.

    Example:
        >>> import random
        >>> words = lambda s: len(s.split())
        >>> chosen = passage("dev", 200, random.Random(0), words)
        >>> 200 <= sum(map(words, chosen)) < 200 + 100
        True
    """
    _check_split(split)
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    pool = sentences(split)
    start = rng.randrange(len(pool))
    chosen: list[str] = []
    total = 0
    for offset in range(len(pool)):
        sentence = pool[(start + offset) % len(pool)]
        chosen.append(sentence)
        total += count_tokens(" " + sentence)
        if total >= tokens:
            return chosen
    raise ValueError(f"split {split!r} holds fewer than {tokens} tokens")


def vocabulary(split: str, min_length: int = 5) -> tuple[str, ...]:
    """Distinct lower-case alphabetic words of `split` with at least `min_length` letters, sorted.

    Example:
        >>> words = vocabulary("dev")
        >>> len(words) > 1000 and all(w.isalpha() and w.islower() for w in words)
        True
    """
    _check_split(split)
    found = {word.strip(".,;:!?\"'()-").lower() for sentence in sentences(split) for word in sentence.split()}
    return tuple(sorted(w for w in found if w.isalpha() and w.isascii() and len(w) >= min_length))
