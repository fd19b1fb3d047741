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

MULTIKEY_KEYS = 3
CHAIN = 2
JSON_ENTRIES = 4
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
TOWNS = ("Ashbourne", "Kettleby", "Marlowe", "Thornfield", "Wickham", "Bramcote", "Elderton", "Foxhollow",
         "Greywater", "Hollins", "Larkspur", "Millbrook", "Northcote", "Oakhurst", "Pennyford", "Redmarsh")
TRADES = ("blacksmith", "baker", "carpenter", "weaver", "potter", "tailor", "miller", "cooper", "saddler",
          "chandler", "glazier", "tanner", "thatcher", "wheelwright")


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
    """Several key words, each with its own 5-8 digit number; asked for one key, give its number."""
    keys = _distinct_words(rng, split, MULTIKEY_KEYS)
    numbers = [_number(rng) for _ in keys]
    needles = [f"The special magic number for {key} is {number}." for key, number in zip(keys, numbers)]
    depths = _spread(rng, len(needles), depth)
    return dict(haystack=_hide(rng, split, length, count_tokens, needles, depths), depth=depths[0],
                question=f"What is the special magic number for {keys[0]}? Answer with the number.",
                answer_prefix=f"The special magic number for {keys[0]} is", answers=(numbers[0],))


def multivalue(rng, split, length, count_tokens, depth):
    """One key word, two 5-8 digit numbers hidden apart; both must be given (score: the share found)."""
    key = _distinct_words(rng, split, 1)[0]
    numbers = [_number(rng) for _ in range(2)]
    needles = [f"One of the special magic numbers for {key} is {n}." for n in numbers]
    depths = _spread(rng, len(needles), depth)
    return dict(haystack=_hide(rng, split, length, count_tokens, needles, depths), depth=depths[0],
                question=f"What are all the special magic numbers for {key}? List both numbers.",
                answer_prefix=f"The special magic numbers for {key} are", answers=tuple(numbers))


def kv_json(rng, split, length, count_tokens, depth):
    """Key-value retrieval from a JSON-like list (word keys, 5-8 digit values) quoted inside the passage."""
    words = corpus.vocabulary(split, min_length=5)
    keys = rng.sample(words, JSON_ENTRIES)
    entries = [(key, _number(rng)) for key in keys]
    key, value = rng.choice(entries)
    record = "The records were kept as follows:\n{\n" + ",\n".join(f'  "{k}": "{v}"' for k, v in entries) + "\n}\n"
    depths = _spread(rng, 1, depth)
    return dict(haystack=_hide(rng, split, length, count_tokens, [record], depths), depth=depths[0],
                question=f'What is the value of the key "{key}" in the JSON object above?',
                answer_prefix=f'The value of "{key}" is "', answers=(value,))


def variable_tracking(rng, split, length, count_tokens, depth):
    """A chain of assignments (VAR B = VAR A, VAR C = VAR B) hidden in prose; give the value at its end."""
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    names = list(dict.fromkeys("".join(rng.choice(letters) for _ in range(4)) for _ in range(8)))[:CHAIN]
    value = _number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    first = depth if depth is not None else rng.uniform(0.05, 0.65)
    depths = [first + (0.95 - first) * step / len(names) for step in range(len(names))]
    return dict(haystack=_hide(rng, split, length, count_tokens, needles, depths), depth=first,
                question=f"What number is VAR {names[-1]} equal to? Follow the assignments and answer with the number.",
                answer_prefix=f"VAR {names[-1]} =", answers=(value,))


def extractive_qa(rng, split, length, count_tokens, depth):
    """A short paragraph about a person, inside the passage; a question answered by a name or a word of it."""
    name, town, trade = _name(rng), rng.choice(TOWNS), rng.choice(TRADES)
    paragraph = (f"{name} was born in the town of {town}. For many years {name.split()[0]} worked there as a "
                 f"{trade}, and everybody in {town} knew {name}, the {trade}.")
    depths = _spread(rng, 1, depth)
    question, prefix, answer = rng.choice([
        (f"In which town was {name} born?", f"{name} was born in the town of", town),
        (f"What did {name} work as?", f"{name} worked as a", trade),
        (f"What was the name of the {trade} from {town}? Give the full name.", f"The {trade} from {town} was", name),
    ])
    return dict(haystack=_hide(rng, split, length, count_tokens, [paragraph], depths), depth=depths[0],
                question=question + " Answer from the text.", answer_prefix=prefix, answers=(answer,))


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

COUNTED_TASKS = ("niah", "multikey", "multivalue", "variable_tracking", "extractive_qa", "passkey")
"""Tasks on which the full cache scores at least 60% on the dev split at ~1.5K tokens, so that a loss
means something. Dev figures of the full cache (SmolLM2-135M-Instruct, calibration seeds 500.. plus
the dev run's seeds 0..2): niah 13/13, multikey 8/13, multivalue 79% of 26 numbers, variable_tracking
9/13, extractive_qa 9/15, passkey 100% (README table); kv_json 3/12 does not count
(`kvpass.eval.report.counted_tasks` recomputes the rule from rows)."""


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


GRID_SEED_START = 10_000
"""Within a split, seeds from here on are the NIAH grid's (one per depth x length cell and sample),
so a grid never reuses a suite sample and its rows are told apart from the suite's by seed alone."""


def grid_seeds(split: str, count: int, start: int = 0) -> list[int]:
    """`count` seeds of `split` for the NIAH grid (see `GRID_SEED_START`).

    Example:
        >>> grid_seeds("test", 1), is_grid_seed(grid_seeds("test", 1)[0]), is_grid_seed(seeds("test", 1)[0])
        ([1010000], True, False)
    """
    return seeds(split, count, GRID_SEED_START + start)


def is_grid_seed(seed: int) -> bool:
    """Whether `seed` is one of its split's NIAH grid seeds."""
    return seed - SPLIT_OFFSETS[split_of(seed)] >= GRID_SEED_START


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
