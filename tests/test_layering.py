"""Data flows one way: config -> data -> model -> train -> experiments -> report -> jobs -> cli."""

import ast
from pathlib import Path

import pytest

import defungi

PACKAGE = Path(defungi.__file__).parent
FORBIDDEN = {  # unit -> what it must not import
    "data": {"models", "train", "experiments", "report", "jobs", "serve", "cli"},
    "models": {"train", "experiments", "report", "jobs", "serve", "cli"},
    "train": {"experiments", "report", "jobs", "serve", "cli"},
    "experiments": {"report", "jobs", "serve", "cli"},
    "report": {"experiments", "train", "models", "jobs", "serve", "cli"},
    "layout": {"experiments", "train", "models", "report", "jobs", "serve", "cli"},
}


def _imports(unit: str) -> set[str]:
    files = [PACKAGE / f"{unit}.py"] if (PACKAGE / f"{unit}.py").exists() else list((PACKAGE / unit).rglob("*.py"))
    found = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found |= {n.split(".")[1] for n in names if n.startswith("defungi.")}
    return found


@pytest.mark.parametrize("unit", sorted(FORBIDDEN))
def test_nothing_lower_imports_anything_higher(unit: str):
    assert not _imports(unit) & FORBIDDEN[unit]
