"""No function in src/ longer than a screen (60 lines)."""

import ast
from pathlib import Path

import defungi

PACKAGE = Path(defungi.__file__).parent
MAX_LINES = 60


def test_no_function_over_a_screen():
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append(f"{f.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not found
