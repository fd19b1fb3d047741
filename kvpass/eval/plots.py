"""PNG plots of the quality suite (matplotlib, headless): accuracy vs budget, NIAH heatmaps, plan budgets.

Rows are result rows as `kvpass.eval.report` reads them (Result objects or dicts).

Example:
    >>> import tempfile, os
    >>> rows = [dict(task="niah", setting=s, mode="query-aware", score=v, seed=0)
    ...         for s, v in [("full", 1.0), ("tova@0.5", 0.5), ("tova@0.25", 0.0)]]
    >>> path = os.path.join(tempfile.mkdtemp(), "acc.png")
    >>> accuracy_vs_budget(rows, path, ["niah"]) == path and os.path.getsize(path) > 0
    True
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from kvpass.eval.report import FULL, as_dicts, mean_scores, split_label


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_budget(rows: Iterable, path: str | Path, tasks: Iterable[str]) -> str:
    """Mean score over `tasks` against the budget, one line per method, one panel per mode."""
    plt = _pyplot()
    rows = as_dicts(rows)
    tasks = list(tasks)
    means = mean_scores(rows)
    modes = sorted({r["mode"] for r in rows})
    full = {m: _average(means, FULL, m, tasks) for m in modes}
    figure, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for axis, mode in zip(axes[0], modes):
        curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for setting in {r["setting"] for r in rows} - {FULL}:
            method, budget = split_label(setting)
            value = _average(means, setting, mode, tasks)
            if value is not None:
                curves[method].append((budget, value))
        for method, points in sorted(curves.items()):
            points = sorted(points) + ([(1.0, full[mode])] if full[mode] is not None else [])
            axis.plot([b for b, _ in points], [100 * v for _, v in points], marker="o", label=method)
        if full[mode] is not None:
            axis.axhline(100 * full[mode], color="black", linestyle="--", linewidth=1, label="full cache")
        axis.set(title=mode, xlabel="KV budget (fraction kept)", ylabel=f"mean score (%), {len(tasks)} tasks",
                 ylim=(0, 105))
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return _save(figure, path)


def niah_heatmap(rows: Iterable, setting: str, mode: str, path: str | Path, title: str | None = None) -> str:
    """Needle-in-a-haystack score (%) of `setting` per depth (rows) x prompt length (columns)."""
    plt = _pyplot()
    cells: dict[tuple[float, int], list[float]] = defaultdict(list)
    for row in as_dicts(rows):
        if row["task"] == "niah" and row["setting"] == setting and row["mode"] == mode:
            cells[(round(row["depth"], 2), _bucket(row["length"]))].append(row["score"])
    if not cells:
        raise ValueError(f"no niah rows for setting={setting!r}, mode={mode!r}")
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    grid = [[100 * sum(cells[(d, n)]) / len(cells[(d, n)]) if cells[(d, n)] else float("nan") for n in lengths]
            for d in depths]
    figure, axis = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    image = axis.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            axis.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    axis.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    axis.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    axis.set(xlabel="prompt tokens", ylabel="needle depth", title=title or f"{setting} ({mode})")
    figure.colorbar(image, ax=axis, label="% correct")
    return _save(figure, path)


def plan_budgets(plan: Any, path: str | Path, title: str = "KV budget per attention site") -> str:
    """Bars of the budget fraction of every site of `plan` (anything with `.budgets`, or a dict site -> fraction)."""
    plt = _pyplot()
    budgets = dict(getattr(plan, "budgets", plan))
    if not budgets:
        raise ValueError("plan has no budgets to plot")
    figure, axis = plt.subplots(figsize=(max(4.0, 0.25 * len(budgets) + 1), 3))
    axis.bar(range(len(budgets)), list(budgets.values()))
    axis.set_xticks(range(len(budgets)), [_short(name) for name in budgets], rotation=90, fontsize=6)
    axis.set(ylabel="fraction of the full cache kept", title=title, ylim=(0, 1.05))
    return _save(figure, path)


def _average(means, setting: str, mode: str, tasks: list[str]) -> float | None:
    values = [means[(t, setting, mode)][0] for t in tasks if (t, setting, mode) in means]
    return sum(values) / len(values) if values else None


def _bucket(length: int) -> int:
    """Prompt lengths rounded to the nearest 250 tokens (generated prompts miss their target slightly)."""
    return int(round(length / 250) * 250)


def _short(site: str) -> str:
    parts = [p for p in site.split(".") if p.isdigit()]
    return parts[0] if parts else site


def _save(figure, path: str | Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return str(path)
