"""The packages' layering (records/__init__.py): every import, function-level ones included,
read from the source, goes down the layers only; so no two packages import each other through
any chain."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: package -> the project's packages it may import (besides itself)
ALLOWED = {
    "records": set(),
    "trainable": {"records"},
    "references": {"records", "trainable"},
    "sweeps": {"records", "trainable", "references"},
    "dashboards": {"records", "trainable", "references"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """{imported top-level project package: files importing it} over the package's modules."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):  # every import, at any depth
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                names = [package]  # relative: within the package
            for name in names:
                top = name.split(".")[0]
                if top in ALLOWED and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_down_the_layers_only(package):
    found = imports_of(package)
    wrong = {k: sorted(v) for k, v in found.items() if k not in ALLOWED[package]}
    assert not wrong, f"{package} imports {wrong}; allowed: {sorted(ALLOWED[package])}"


def test_the_layering_has_no_cycle():
    """The allowed graph itself is acyclic (so the checks above rule out every cycle)."""
    order = ["records", "trainable", "references", "sweeps", "dashboards"]
    for i, pkg in enumerate(order):
        assert ALLOWED[pkg] <= set(order[:i]), pkg
    assert "sweeps" not in ALLOWED["dashboards"] and "dashboards" not in ALLOWED["sweeps"]


def test_the_checker_sees_function_level_imports(tmp_path, monkeypatch):
    """The test can fail: an import inside a function body is found."""
    pkg = tmp_path / "trainable"
    pkg.mkdir()
    (pkg / "x.py").write_text("def f():\n    from sweeps import execute\n    return execute\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert imports_of("trainable") == {"sweeps": {"trainable/x.py"}}
