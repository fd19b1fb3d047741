"""Imports point one way (DESIGN.md): no module of kvpass imports, directly or through others, a module
that imports it back, and the planner never reaches a runtime."""

from __future__ import annotations

import ast
from pathlib import Path

import kvpass

PACKAGE = Path(kvpass.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """kvpass modules imported at module level (TYPE_CHECKING blocks and imports inside functions are
    how a lower layer names a higher one's types, or defers an optional dependency)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvpass"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kvpass"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _reaches(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in edges[stack.pop()]:
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_no_import_cycles_between_modules() -> None:
    # A package's __init__ imports its own modules to re-export them; a module importing its own
    # package back is how Python packages work, not a layering cycle.
    edges = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph().items()}
    cycles = sorted(name for name in edges if name in _reaches(edges, name))
    assert not cycles, f"modules that import themselves back: {cycles}"


def test_planning_never_imports_a_runtime_or_a_transform() -> None:
    edges = graph()
    for name in edges:
        if name.startswith(("kvpass.planning", "kvpass.cost", "kvpass.calibration", "kvpass.methods", "kvpass.site")):
            reached = _reaches(edges, name)
            assert not {m for m in reached if m.startswith(("kvpass.runtime", "kvpass.transforms", "kvpass.api"))}, name
