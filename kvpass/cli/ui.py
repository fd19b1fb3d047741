"""What the command line shows: rich tables and progress on a terminal, one JSON object with --json.

Progress goes to stderr and disappears when its stage ends (and is not drawn at all when stderr
is not a terminal), so stdout holds only the result: tables for people, or JSON for programs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

PIPED_WIDTH = 160
"""Table width when stdout is not a terminal (a file, a pipe, a test), unless COLUMNS says otherwise."""


class UI:
    """Where a subcommand's output and progress go.

    Example:
        >>> import io
        >>> ui = UI(json_output=True, stdout=io.StringIO())
        >>> ui.emit({"sites": 2}, render=None)
        >>> ui.stdout.getvalue()
        '{\\n  "sites": 2\\n}\\n'
    """

    def __init__(self, json_output: bool = False, stdout: TextIO | None = None):
        self.json_output = json_output
        self.stdout = stdout if stdout is not None else sys.stdout
        self.console = Console(file=self.stdout, highlight=False)
        if not self.console.is_terminal and "COLUMNS" not in os.environ:  # piped: no wrapping at 80 columns
            self.console = Console(file=self.stdout, highlight=False, width=PIPED_WIDTH)
        self.progress_console = Console(stderr=True)

    @contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """A progress bar for one long step (a pulsing one when `total` is unknown); yields `advance(n)`."""
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
        columns += [MofNCompleteColumn()] if total is not None else []
        progress = Progress(*columns, TimeElapsedColumn(), console=self.progress_console, transient=True,
                            disable=not self.progress_console.is_terminal)
        with progress:
            task = progress.add_task(description, total=total)
            yield lambda steps=1: progress.advance(task, steps)

    def emit(self, result: dict[str, Any], render: Callable[[Console, dict[str, Any]], None] | None) -> None:
        """Print `result`: as JSON with --json, else through `render` (rich tables)."""
        if self.json_output or render is None:
            self.stdout.write(json.dumps(result, indent=2) + "\n")
        else:
            render(self.console, result)


def table(title: str, columns: list[str], rows: list[list[Any]], right: set[str] = frozenset(),
          header: bool = True) -> Table:
    """A plain rich table; columns named in `right` are right-aligned (numbers)."""
    grid = Table(title=title, title_justify="left", title_style="bold", show_header=header)
    for column in columns:
        grid.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        grid.add_row(*("-" if cell is None else str(cell) for cell in row))
    return grid


def size(count: int) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1 (KV caches range from KiB to GiB).

    Example:
        >>> size(512), size(3 * 2**20 // 2), size(2**30)
        ('512 B', '1.50 MiB', '1.00 GiB')
    """
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"
