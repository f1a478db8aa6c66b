"""No function in src/ longer than a screen (60 lines)."""

import ast
from pathlib import Path

import pytest

import defungi

PACKAGE = Path(defungi.__file__).parent
MAX_LINES = 60
# parts of the second redesign that land separately (issue 24): their long functions go with them
ELSEWHERE = ("experiments/fit.py", "experiments/train.py", "experiments/rundir.py", "experiments/studies/")
ELSEWHERE += ("report/study.py", "models/")


def _long_functions(elsewhere: tuple[str, ...] = ()) -> list[str]:
    """'path:line name (n lines)' for every function or method over MAX_LINES."""
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        name = f.relative_to(PACKAGE).as_posix()
        if name.startswith(elsewhere):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_a_screen_outside_the_parts_landing_separately():
    assert not _long_functions(ELSEWHERE)


@pytest.mark.xfail(reason="other parts of the redesign land separately", strict=False)
def test_no_function_over_a_screen():
    assert not _long_functions()
