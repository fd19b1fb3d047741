"""Long-context retrieval tasks, generated from a seed, with haystacks of real prose.

Every task builds a `Sample`: an instruction and a context (corpus passage with facts
hidden in it, or a JSON-like list), then a question and the start of the answer. The
context / question split lets each sample run in both evaluation modes:

* query-aware: the whole prompt is prefilled, then evicted (what `generate` does);
* context-only: the context is prefilled and evicted before the question arrives (what
  kvpress measures, and what reusing a cache across turns needs).

Seeds come in two disjoint splits, and each split draws its text from its own part of
the corpus (`kvpass.eval.corpus`): choices are made on "dev", figures reported on "test".

Example:
    >>> s = make_sample("niah", "dev", 0, length=400, count_tokens=lambda t: len(t.split()))
    >>> s.answers[0] in s.context, s.question.startswith("What is the special magic number")
    (True, True)
    >>> score(s, " The special magic number is " + s.answers[0])
    1.0
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from kvpass.eval import corpus, passkey

SPLIT_OFFSETS = {"dev": 0, "test": 1_000_000}
"""Seeds of the development split are 0..999999, those of the test split 1000000 and up."""

OVERHEAD_TOKENS = 150
"""Prompt tokens that are not haystack: chat template, instruction, needles, question."""

INSTRUCTION = ("Read the text below carefully. Some sentences in it hold codes, numbers or names: "
               "remember them, I will ask about them afterwards.\n\n")

FIRST_NAMES = ("Margaret", "Thomas", "Eleanor", "Arthur", "Beatrice", "Walter", "Florence", "Harold", "Edith",
               "Leonard", "Agnes", "Frederick", "Matilda", "Oswald", "Winifred", "Cecil", "Dorothy", "Rupert",
               "Harriet", "Ambrose", "Lillian", "Percival", "Clara", "Ignatius")
LAST_NAMES = ("Holloway", "Pemberton", "Ashworth", "Blackwood", "Fairbanks", "Kingsley", "Thornbury", "Whitlock",
              "Gladstone", "Merriweather", "Ravensworth", "Cartwright", "Hargreaves", "Lockhart", "Sinclair",
              "Wetherby", "Abernathy", "Brightwell", "Dunmore", "Everleigh")


@dataclass(frozen=True)
class Sample:
    """One prompt of one task, as text; `encode` turns it into token ids."""

    task: str
    split: str
    seed: int
    context: str
    """The user turn up to the question: instruction and haystack with the hidden facts."""
    question: str
    answer_prefix: str
    """The assistant turn's first words, so that the answer comes next."""
    answers: tuple[str, ...]
    """Every string the answer must contain (numbers as digits, words, names)."""
    depth: float
    """Where the (first) fact sits in the haystack, as a fraction of it."""
    max_new_tokens: int


@dataclass(frozen=True)
class Prompt:
    """A sample's token ids, split where the question starts."""

    context_ids: "torch.Tensor"  # noqa: F821  (torch is imported by encode only)
    """[1, Lc] the chat-formatted prompt up to the question."""
    question_ids: "torch.Tensor"  # noqa: F821
    """[1, Lq] the question, the end of the user turn and the answer prefix."""

    @property
    def prompt_ids(self):
        import torch

        return torch.cat([self.context_ids, self.question_ids], dim=-1)


Builder = Callable[[random.Random, str, int, Callable[[str], int], float | None], dict]


def _number(rng: random.Random, digits: int | None = None) -> str:
    digits = digits if digits is not None else rng.randint(5, 8)
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _distinct_words(rng: random.Random, split: str, count: int) -> list[str]:
    return rng.sample(corpus.vocabulary(split, min_length=6), count)


def _hide(rng, split, length, count_tokens, needles: list[str], depths: list[float]) -> str:
    """A corpus passage of about `length` prompt tokens with `needles` inserted at `depths`."""
    budget = length - OVERHEAD_TOKENS - sum(count_tokens(" " + n) for n in needles)
    sentences = corpus.passage(split, max(budget, 50), rng, count_tokens)
    for needle, depth in sorted(zip(needles, depths), key=lambda pair: -pair[1]):
        sentences.insert(round(depth * len(sentences)), needle)
    return " ".join(sentences)


def _spread(rng: random.Random, count: int, depth: float | None) -> list[float]:
    """`count` depths in [0.05, 0.95], the first at `depth` when given."""
    first = depth if depth is not None else rng.uniform(0.05, 0.95)
    return [first] + [rng.uniform(0.05, 0.95) for _ in range(count - 1)]


def niah(rng, split, length, count_tokens, depth):
    """Needle in a haystack: one 5-8 digit number for a key word, hidden at `depth`."""
    key, number = _distinct_words(rng, split, 1)[0], _number(rng)
    needle = f"The special magic number for {key} is {number}."
    depths = _spread(rng, 1, depth)
    return dict(haystack=_hide(rng, split, length, count_tokens, [needle], depths), depth=depths[0],
                question=f"What is the special magic number for {key}? Answer with the number.",
                answer_prefix=f"The special magic number for {key} is", answers=(number,))


def multikey(rng, split, length, count_tokens, depth):
    """Several people keep the keys of several rooms; asked for one room, name its keeper."""
    rooms = _distinct_words(rng, split, 4)
    names = rng.sample(sorted({_name(rng) for _ in range(16)}), 4)
    needles = [f"The key to the {room} room is kept by {name}." for room, name in zip(rooms, names)]
    depths = _spread(rng, len(needles), depth)
    return dict(haystack=_hide(rng, split, length, count_tokens, needles, depths), depth=depths[0],
                question=f"Who keeps the key to the {rooms[0]} room? Answer with the full name.",
                answer_prefix=f"The key to the {rooms[0]} room is kept by", answers=(names[0],))


def multivalue(rng, split, length, count_tokens, depth):
    """One key word, three 5-8 digit numbers hidden apart; all three must be given."""
    key = _distinct_words(rng, split, 1)[0]
    numbers = [_number(rng) for _ in range(3)]
    needles = [f"One of the special magic numbers for {key} is {n}." for n in numbers]
    depths = _spread(rng, len(needles), depth)
    return dict(haystack=_hide(rng, split, length, count_tokens, needles, depths), depth=depths[0],
                question=f"What are all the special magic numbers for {key}? List the three numbers.",
                answer_prefix=f"The special magic numbers for {key} are", answers=tuple(numbers))


def kv_json(rng, split, length, count_tokens, depth):
    """Key-value retrieval from a JSON-like list: word-pair keys, 5-8 digit values."""
    words = corpus.vocabulary(split, min_length=5)
    entries: list[tuple[str, str]] = []
    used: set[str] = set()
    total = 0
    while total < length - OVERHEAD_TOKENS:
        key = f"{rng.choice(words)}-{rng.choice(words)}"
        if key in used:
            continue
        used.add(key)
        entries.append((key, _number(rng)))
        total += count_tokens(f' "{key}": "{entries[-1][1]}",')
    index = round((depth if depth is not None else rng.uniform(0.05, 0.95)) * (len(entries) - 1))
    key, value = entries[index]
    body = ",\n".join(f'  "{k}": "{v}"' for k, v in entries)
    return dict(haystack="{\n" + body + "\n}", depth=index / max(len(entries) - 1, 1),
                question=f'What is the value of the key "{key}" in the JSON object above?',
                answer_prefix=f'The value of "{key}" is "', answers=(value,))


def variable_tracking(rng, split, length, count_tokens, depth):
    """Two chains of assignments (VAR B = VAR A ...) hidden in prose; give the value at one chain's end."""
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    names = list(dict.fromkeys("".join(rng.choice(letters) for _ in range(4)) for _ in range(12)))[:6]
    chains = [names[:3], names[3:]]
    values = [_number(rng, 5), _number(rng, 5)]
    needles, depths = [], []
    first = depth if depth is not None else rng.uniform(0.05, 0.45)
    for chain, value, start in zip(chains, values, (first, rng.uniform(0.05, 0.45))):
        needles.append(f"VAR {chain[0]} = {value}.")
        needles += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        depths += [start + (0.95 - start) * step / len(chain) for step in range(len(chain))]
    return dict(haystack=_hide(rng, split, length, count_tokens, needles, depths), depth=first,
                question=f"What is the value of VAR {chains[0][-1]}? Follow the assignments and answer with "
                         "the number.",
                answer_prefix=f"VAR {chains[0][-1]} =", answers=(values[0],))


def extractive_qa(rng, split, length, count_tokens, depth):
    """A sentence of the passage is quoted with one word blanked out; name the missing word."""
    target = depth if depth is not None else rng.uniform(0.05, 0.95)
    sentences = corpus.passage(split, length - OVERHEAD_TOKENS - 40, rng, count_tokens)
    order = sorted(range(len(sentences)), key=lambda i: abs(i / len(sentences) - target))
    for index in order:
        words = sentences[index].split()
        candidates = [i for i, w in enumerate(words[1:], 1)
                      if w.isalpha() and w.islower() and len(w) >= 6 and words.count(w) == 1]
        if len(words) >= 12 and candidates and '"' not in sentences[index]:
            blank = rng.choice(candidates)
            answer = words[blank]
            quoted = " ".join(words[:blank] + ["____"] + words[blank + 1:])
            return dict(haystack=" ".join(sentences), depth=index / len(sentences),
                        question=f'One word is missing from this sentence of the text above: "{quoted}" '
                                 "Which word is missing?",
                        answer_prefix='The missing word is "', answers=(answer,))
    raise RuntimeError("no sentence of the passage can be quoted with a blank")


def passkey_task(rng, split, length, count_tokens, depth):
    """The DESIGN.md passkey protocol (repeated filler, one 5-digit key), kept for comparison."""
    key = str(rng.randint(10000, 99999))
    depth = depth if depth is not None else rng.uniform(0.1, 0.9)
    repeats = max(2, (length - 120) // count_tokens(passkey.FILLER))
    before = round(repeats * depth)
    haystack = passkey.FILLER * before + passkey.NEEDLE.format(key=key) + passkey.FILLER * (repeats - before)
    return dict(haystack=haystack, depth=depth, question=passkey.QUESTION.strip(),
                answer_prefix=passkey.ANSWER_PREFIX, answers=(key,), instruction=passkey.INSTRUCTION)


TASKS: dict[str, Builder] = {
    "niah": niah,
    "multikey": multikey,
    "multivalue": multivalue,
    "kv_json": kv_json,
    "variable_tracking": variable_tracking,
    "extractive_qa": extractive_qa,
    "passkey": passkey_task,
}
"""Every retrieval task by name (perplexity is measured separately: `kvpass.eval.perplexity`)."""


def seeds(split: str, count: int, start: int = 0) -> list[int]:
    """`count` seeds of `split`; the splits never share a seed.

    Example:
        >>> seeds("dev", 2), seeds("test", 2)
        ([0, 1], [1000000, 1000001])
    """
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split={split!r} is not a seed split; expected one of {sorted(SPLIT_OFFSETS)}")
    if count < 0 or start < 0 or start + count > 1_000_000:
        raise ValueError(f"count={count} and start={start} must lie within 0..1000000")
    return [SPLIT_OFFSETS[split] + start + i for i in range(count)]


def split_of(seed: int) -> str:
    """The split a seed belongs to."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return "test" if seed >= SPLIT_OFFSETS["test"] else "dev"


def make_sample(task: str, split: str, seed: int, length: int, count_tokens: Callable[[str], int],
                depth: float | None = None) -> Sample:
    """Sample `seed` of `task`, about `length` prompt tokens, text from the `split` part of the corpus.

    `seed` must belong to `split` (see `seeds`); `depth` in [0, 1] pins where the (first)
    fact is hidden, otherwise it is drawn from the seed. Same arguments, same sample.

    Example:
        >>> words = lambda t: len(t.split())
        >>> a = make_sample("kv_json", "test", 1000000, 300, words)
        >>> a == make_sample("kv_json", "test", 1000000, 300, words), a.answers[0] in a.context
        (True, True)
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not a known task; expected one of {sorted(TASKS)}")
    if split_of(seed) != split or split not in SPLIT_OFFSETS:
        raise ValueError(f"seed={seed} does not belong to split={split!r}; take seeds from kvpass.eval.tasks.seeds")
    if length < OVERHEAD_TOKENS + 100:
        raise ValueError(f"length={length} is too short; give at least {OVERHEAD_TOKENS + 100} tokens")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1]")
    rng = random.Random(f"{task}:{seed}")
    parts = TASKS[task](rng, split, length, count_tokens, depth)
    answers = parts["answers"]
    return Sample(task=task, split=split, seed=seed,
                  context=parts.get("instruction", INSTRUCTION) + parts["haystack"],
                  question=parts["question"], answer_prefix=parts["answer_prefix"], answers=answers,
                  depth=parts["depth"], max_new_tokens=4 + sum(len(a) + 2 for a in answers))


def token_counter(tokenizer) -> Callable[[str], int]:
    """Token count of a text fragment under `tokenizer` (no special tokens), for `make_sample`."""
    return lambda fragment: len(tokenizer(fragment, add_special_tokens=False).input_ids)


def encode(tokenizer, sample: Sample) -> Prompt:
    """The chat-formatted token ids of `sample`, split where the question starts.

    The user turn is context + "\\n\\n" + question; the assistant turn starts with the answer prefix.
    """
    marker = "\x00QUESTION\x00"
    messages = [{"role": "user", "content": sample.context + marker}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    context_text, rest = (text + sample.answer_prefix).split(marker)
    ids = lambda part: tokenizer(part, add_special_tokens=False, return_tensors="pt").input_ids  # noqa: E731
    return Prompt(ids(context_text), ids("\n\n" + sample.question + rest))


def score(sample: Sample, generated: str) -> float:
    """Fraction of the sample's answers found in `generated` text.

    Numbers must appear as a whole digit run (12345 is not found in 123456); words and names
    as whole words, ignoring case.

    Example:
        >>> s = Sample("t", "dev", 0, "", "", "", ("48213", "Clara Dunmore"), 0.5, 20)
        >>> score(s, "48213 and clara dunmore"), score(s, "482130, Clara Dunmore"), score(s, "4821")
        (1.0, 0.5, 0.0)
    """
    found = 0
    for answer in sample.answers:
        if answer.isdigit():
            pattern = rf"(?<!\d){answer}(?!\d)"
        else:
            pattern = rf"(?<!\w){re.escape(answer)}(?!\w)"
        found += re.search(pattern, generated, flags=re.IGNORECASE) is not None
    return found / len(sample.answers)
