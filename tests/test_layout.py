"""The import graph has one direction: ``learned_opt`` and ``tasks`` are independent packages at
the bottom, ``outer_train`` sits above both, and nothing imports ``bench`` or ``examples``.
Checked on the source (every ``import`` statement, also those inside functions), so a lazy
import cannot hide an upward dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> the project packages it may import (besides itself)
ALLOWED = {
    "learned_opt": set(),
    "tasks": set(),
    "outer_train": {"learned_opt", "tasks"},
}
PROJECT = {*ALLOWED, "bench", "examples"}


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    bad = {}
    for path in sorted((REPO / package).rglob("*.py")):
        upward = _imported_packages(path) - ALLOWED[package] - {package}
        if upward:
            bad[str(path.relative_to(REPO))] = sorted(upward)
    assert not bad, f"imports against the layering: {bad}"


def test_no_string_dispatch_to_modules():
    """Modules are imported by name in code, never through importlib (which hides the graph)."""
    users = [
        str(p.relative_to(REPO))
        for package in ALLOWED
        for p in sorted((REPO / package).rglob("*.py"))
        if "import_module(" in p.read_text()
    ]
    assert not users, users
