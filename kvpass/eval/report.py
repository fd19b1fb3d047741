"""Tables from evaluation results: accuracy per task, retention against the full cache.

Rows are `kvpass.eval.runner.Result`s (or dicts with the same fields, as saved in JSONL).
A setting label reads "method@budget" ("tova:span=2@0.5"); the full cache is "full".
Retention of a setting on a task = its mean score / the full cache's mean score on the
same samples; the suite's retention averages it over the counted tasks only (those where
the full cache is right often enough on the development split for a loss to mean something).

Example:
    >>> rows = [dict(task="niah", setting="full", mode="query-aware", score=1.0, seed=0),
    ...         dict(task="niah", setting="tova@0.5", mode="query-aware", score=0.5, seed=0)]
    >>> retention(rows, "tova@0.5", "query-aware", ["niah"])
    0.5
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Iterable

FULL = "full"
COUNT_THRESHOLD = 0.6
"""A task counts toward retention when the full cache scores at least this on the dev split."""


def as_dicts(rows: Iterable) -> list[dict]:
    """Result rows as dicts, whether fresh (`kvpass.eval.runner.Row`) or loaded from JSONL."""
    return [asdict(r) if is_dataclass(r) else dict(r) for r in rows]


def label(method: str, budget: float) -> str:
    """The setting label of `method` (a spec such as "tova:span=2") at `budget`."""
    return f"{method}@{budget:g}"


def split_label(setting: str) -> tuple[str, float]:
    """("tova:span=2", 0.5) from "tova:span=2@0.5"; ("full", 1.0) for the full cache."""
    if setting == FULL:
        return FULL, 1.0
    method, _, budget = setting.rpartition("@")
    return method, float(budget)


def mean_scores(rows: Iterable) -> dict[tuple[str, str, str], tuple[float, int]]:
    """(task, setting, mode) -> (mean score, samples)."""
    sums: dict[tuple, list[float]] = defaultdict(list)
    for row in as_dicts(rows):
        sums[(row["task"], row["setting"], row["mode"])].append(row["score"])
    return {key: (sum(v) / len(v), len(v)) for key, v in sums.items()}


def counted_tasks(dev_rows: Iterable, threshold: float = COUNT_THRESHOLD) -> list[str]:
    """Tasks whose full-cache mean score on `dev_rows` is at least `threshold` (either mode: they are equal)."""
    means = mean_scores(dev_rows)
    return sorted({task for (task, setting, _), (value, _) in means.items() if setting == FULL and value >= threshold})


def retention(rows: Iterable, setting: str, mode: str, tasks: Iterable[str]) -> float:
    """Mean over `tasks` of (setting's mean score / full cache's mean score), in `mode`.

    A task where the full cache scored 0 is skipped (nothing to retain)."""
    means = mean_scores(rows)
    ratios = []
    for task in tasks:
        full = means.get((task, FULL, mode))
        got = means.get((task, setting, mode))
        if full and got and full[0] > 0:
            ratios.append(got[0] / full[0])
    if not ratios:
        raise ValueError(f"no results for setting={setting!r}, mode={mode!r} on tasks {list(tasks)}")
    return sum(ratios) / len(ratios)


def accuracy_table(rows: Iterable, modes: Iterable[str], tasks: Iterable[str] | None = None,
                   counted: Iterable[str] = ()) -> str:
    """Markdown: one line per setting and mode, mean score (%) per task, retention over `counted` tasks."""
    rows = as_dicts(rows)
    means = mean_scores(rows)
    tasks = list(tasks) if tasks is not None else sorted({r["task"] for r in rows})
    counted = [t for t in counted if t in tasks]
    settings = sorted({r["setting"] for r in rows}, key=lambda s: (s != FULL, split_label(s)[0], -split_label(s)[1]))
    samples = max((n for (_, _, _), (_, n) in means.items()), default=0)
    header = ["setting", "mode", *[f"{t}{'*' if t in counted else ''}" for t in tasks]]
    if counted:
        header.append("retention*")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting in settings:
        for mode in modes if setting != FULL else list(modes)[:1]:
            cells = []
            for task in tasks:
                value = means.get((task, setting, mode))
                cells.append("" if value is None else f"{100 * value[0]:.0f}")
            if counted:
                cells.append("100" if setting == FULL else _retention_cell(rows, setting, mode, counted))
            shown_mode = "both" if setting == FULL else mode
            lines.append(f"| {setting} | {shown_mode} | " + " | ".join(cells) + " |")
    note = f"scores in % ({samples} samples per cell at most)"
    if counted:
        note += "; * counted tasks (full cache >= 60% on dev); retention = mean over them of score / full cache"
    return "\n".join(lines) + "\n" + note


def _retention_cell(rows: list[dict], setting: str, mode: str, counted: list[str]) -> str:
    """Retention in %, or "-" where the full cache scored nothing on the counted tasks (nothing to retain)."""
    try:
        return f"{100 * retention(rows, setting, mode, counted):.1f}"
    except ValueError:
        return "-"


def save_jsonl(rows: Iterable, path: str | Path) -> None:
    """Write result rows, one JSON object per line."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in as_dicts(rows)))


def load_jsonl(path: str | Path) -> list[dict]:
    """Result rows written by `save_jsonl`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
