"""The kvpass pytest plugin (entry point `pytest11`): `--kvpass-update-golden` and the `kvpass_golden` fixture.

Imported by pytest at start-up in every project where kvpass is installed, so it imports nothing
heavy: the kit itself is imported when a test asks for the fixture.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

UPDATE_OPTION = "--kvpass-update-golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("kvpass").addoption(
        UPDATE_OPTION, action="store_true",
        help="rewrite kvpass golden graph summaries (golden/<test file>.<test>.txt beside the tests) instead of "
             "comparing with them")


@pytest.fixture
def kvpass_golden(request: pytest.FixtureRequest) -> Callable[..., None]:
    """`kvpass_golden(model_or_summary, name=None)`: compare the graph summary of an optimized model (or a
    summary text) with `golden/<test file>.<name or test name>.txt` beside the test file.

    Example:
        >>> def test_llama_rewrite(kvpass_golden):          # doctest: +SKIP
        ...     kvpass_golden(kvpass.optimize(tiny_llama(), budget=0.5))
    """
    update = request.config.getoption(UPDATE_OPTION)
    test_file = Path(request.node.path)

    def check(model_or_summary: Any, name: str | None = None, **summary_options: Any) -> None:
        from kvpass.testing.golden import assert_golden, graph_summary

        summary = model_or_summary if isinstance(model_or_summary, str) else graph_summary(model_or_summary,
                                                                                           **summary_options)
        label = re.sub(r"[^\w.-]+", "_", name or request.node.name).strip("_")
        assert_golden(summary, test_file.parent / "golden" / f"{test_file.stem}.{label}.txt", update=update)

    return check
