"""The quality suite's pieces without the real model: corpus, tasks, scoring, shared prefill, perplexity, plots."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

import kvpass
from kvpass.eval import corpus, plots
from kvpass.eval.perplexity import perplexities
from kvpass.eval.report import accuracy_table, counted_tasks, retention
from kvpass.eval.sweep import record_prefill, record_prefixes
from kvpass.eval.tasks import TASKS, Sample, make_sample, score, seeds, split_of
from kvpass.methods import Stat
from test_optimize import tiny_llama


def words(text: str) -> int:
    """A stand-in tokenizer: one token per word (the real one only changes the lengths)."""
    return len(text.split())


def test_corpus_splits_are_disjoint_and_large() -> None:
    splits = {name: set(corpus.sentences(name)) for name in corpus.SPLITS}
    assert not splits["dev"] & splits["test"] and not splits["dev"] & splits["perplexity"]
    assert not splits["test"] & splits["perplexity"]
    assert len(splits["dev"]) > 1000 and len(splits["test"]) > 1000 and len(splits["perplexity"]) > 200
    with pytest.raises(ValueError, match="split="):
        corpus.sentences("train")


def test_passage_is_consecutive_non_repeating_and_long_enough() -> None:
    import random

    chosen = corpus.passage("test", 2000, random.Random(1), words)
    assert len(set(chosen)) == len(chosen) and sum(map(words, chosen)) >= 2000
    pool = corpus.sentences("test")
    start = pool.index(chosen[0])
    assert chosen[:5] == [pool[(start + i) % len(pool)] for i in range(5)]


def test_seed_splits_are_disjoint() -> None:
    dev, test = seeds("dev", 500), seeds("test", 500)
    assert not set(dev) & set(test)
    assert {split_of(s) for s in dev} == {"dev"} and {split_of(s) for s in test} == {"test"}
    with pytest.raises(ValueError, match="split="):
        seeds("train", 1)
    with pytest.raises(ValueError, match="seed="):
        make_sample("niah", "test", dev[0], 500, words)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_samples_are_deterministic_per_seed(task) -> None:
    a = make_sample(task, "dev", 7, 600, words)
    assert a == make_sample(task, "dev", 7, 600, words)
    assert a != make_sample(task, "dev", 8, 600, words)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_answers_are_in_the_context_at_the_stated_depth(task, depth) -> None:
    sample = make_sample(task, "test", seeds("test", 1, start=3)[0], 1500, words, depth=depth)
    assert sample.depth == pytest.approx(depth, abs=0.05)
    for answer in sample.answers:
        assert re.search(rf"(?<![\w]){re.escape(answer)}(?![\w])", sample.context), answer
        assert answer not in sample.question
    first = sample.answers[0]
    where = [m.start() for m in re.finditer(re.escape(first), sample.context)]
    assert any(abs(p / len(sample.context) - depth) < 0.1 for p in where), (where, len(sample.context))
    assert 1300 <= words(sample.context) <= 1700


def test_dev_and_test_haystacks_come_from_their_corpus_split() -> None:
    sample = make_sample("niah", "dev", 0, 800, words)
    dev_text = corpus.text("dev")
    sentences = [s for s in re.split(r"(?<=[.!?]) ", sample.context.split("\n\n", 1)[1]) if "magic" not in s]
    assert sum(s in dev_text for s in sentences) >= 0.9 * len(sentences)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="task="):
        make_sample("sudoku", "dev", 0, 800, words)
    with pytest.raises(ValueError, match="length="):
        make_sample("niah", "dev", 0, 100, words)
    with pytest.raises(ValueError, match="depth="):
        make_sample("niah", "dev", 0, 800, words, depth=1.5)


def test_scorer_marks_right_and_wrong_answers() -> None:
    sample = Sample("niah", "dev", 0, "", "", "", ("12345678",), 0.5, 12)
    assert score(sample, " 12345678.") == 1.0
    assert score(sample, " 1234567.") == 0.0  # the last digit lost
    assert score(sample, " 123456789") == 0.0  # a longer number is another number
    assert score(sample, "It is 12,345,678") == 0.0
    names = Sample("multikey", "dev", 0, "", "", "", ("Clara Dunmore", "weaver"), 0.5, 12)
    assert score(names, "clara dunmore, the Weaver.") == 1.0
    assert score(names, "Clara Dunmoreson, weavers") == 0.0
    assert score(names, "Clara Dunmore") == 0.5


def test_retention_counts_only_counted_tasks() -> None:
    rows = [dict(task=t, setting=s, mode="context-only", score=v, seed=0)
            for t, s, v in [("a", "full", 1.0), ("a", "m@0.5", 0.5), ("b", "full", 0.5), ("b", "m@0.5", 0.5),
                            ("c", "full", 0.2), ("c", "m@0.5", 0.0)]]
    assert counted_tasks(rows) == ["a"]
    assert retention(rows, "m@0.5", "context-only", ["a", "b"]) == pytest.approx(0.75)
    table = accuracy_table(rows, ["context-only"], ["a", "b", "c"], ["a", "b"])
    assert "| m@0.5 | context-only | 50 | 50 | 0 | 75.0 |" in table


@pytest.fixture(scope="module")
def tiny():
    return kvpass.optimize(copy.deepcopy(tiny_llama()), budget=1.0)


def test_prefix_recordings_equal_separate_prefills(tiny) -> None:
    ids = torch.randint(1, 128, (1, 90), generator=torch.Generator().manual_seed(0))
    shared = record_prefixes(tiny, ids, [50, 90])
    for length in (50, 90):
        alone = record_prefill(tiny, ids[:, :length])
        for index, layer in alone.layers.items():
            other = shared[length].layers[index]
            torch.testing.assert_close(other.keys, layer.keys)
            for stat in (Stat.COLUMN_SUM, Stat.WINDOW, Stat.LAST_QUERY):
                torch.testing.assert_close(other.stats[stat], layer.stats[stat], rtol=1e-4, atol=1e-5)


def test_perplexity_with_the_full_cache_is_the_plain_models(tiny) -> None:
    windows = [torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plans = {"full": kvpass.plan(tiny, 1.0, allocation="uniform"),
             "h2o@0.25": kvpass.plan(tiny, 0.25, "h2o", allocation="uniform")}
    got = perplexities(tiny, windows, 40, plans)
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = tiny(window).logits[0, 40:-1]
            total += torch.nn.functional.cross_entropy(logits, window[0, 41:], reduction="sum").item()
            count += window.shape[-1] - 41
    assert got["full"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert got["h2o@0.25"] != pytest.approx(got["full"], rel=1e-4)
    with pytest.raises(ValueError, match="context="):
        perplexities(tiny, windows, 63, plans)


def test_plots_write_png_files(tmp_path, tiny) -> None:
    rows = [dict(task="niah", setting=s, mode=m, score=v, seed=0, depth=d, length=n)
            for s, v in [("full", 1.0), ("tova@0.5", 0.5), ("tova@0.25", 0.0)]
            for m in ("query-aware", "context-only") for d in (0.1, 0.9) for n in (500, 1000)]
    written = [plots.accuracy_vs_budget(rows, tmp_path / "acc.png", ["niah"]),
               plots.niah_heatmap(rows, "tova@0.5", "context-only", tmp_path / "niah.png"),
               plots.plan_budgets(kvpass.plan(tiny, 0.5, allocation="uniform"), tmp_path / "plan.png"),
               plots.plan_budgets({"model.layers.0.self_attn": 0.3, "model.layers.1.self_attn": 0.7},
                                  tmp_path / "plan_dict.png")]
    for path in written:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="setting="):
        plots.niah_heatmap(rows, "snapkv@0.5", "context-only", tmp_path / "none.png")
