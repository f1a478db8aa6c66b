"""Data flows one way: config -> data -> model -> train -> experiments -> report -> jobs -> cli."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import defungi
from tests.conftest import SRC

PACKAGE = Path(defungi.__file__).parent
FORBIDDEN = {  # unit -> what it must not import
    "data": {"models", "train", "experiments", "report", "jobs", "serve", "cli"},
    "models": {"train", "experiments", "report", "jobs", "serve", "cli"},
    "train": {"experiments", "report", "jobs", "serve", "cli"},
    "experiments": {"report", "jobs", "serve", "cli"},
    # answering loads a run's model (train.checkpoint) and its checks (train.assess, train.ood), never a fit's code
    "serve": {"experiments", "jobs", "cli"},
    "report": {"experiments", "train", "models", "jobs", "serve", "cli"},
    "layout": {"experiments", "train", "models", "report", "jobs", "serve", "cli"},
    "results": {"config", "data", "models", "train", "experiments", "report", "jobs", "serve", "cli", "layout"},
    # answers' statistics, below every layer but errors: training and answering use them alike
    "stats": {"config", "data", "models", "train", "experiments", "report", "jobs", "serve", "cli", "layout"}
    | {"results"},
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


# each module of report/, the layout and the metrics, imported in a fresh interpreter: none may pull torch in
TORCH_FREE = {
    "report": "import pkgutil, defungi.report as r\n"
    "for m in pkgutil.iter_modules(r.__path__): __import__(f'defungi.report.{m.name}')",
    "layout": "import defungi.layout",
    # the scores behind report/'s tables and the ONNX predict path, sets and selective answers
    "stats": "import pkgutil, defungi.stats as s\n"
    "for m in pkgutil.iter_modules(s.__path__): __import__(f'defungi.stats.{m.name}')",
    "results": "import pkgutil, defungi.results as r\n"
    "for m in pkgutil.iter_modules(r.__path__): __import__(f'defungi.results.{m.name}')",
}


@pytest.mark.parametrize("unit", sorted(TORCH_FREE))
def test_reports_and_the_layout_import_without_torch(unit: str):
    code = f"{TORCH_FREE[unit]}\nimport sys\nassert 'torch' not in sys.modules, 'torch imported'"
    env = os.environ | {"PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _module_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (at the top or inside a function)."""
    names = {
        ".".join(("defungi", *f.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): f
        for f in PACKAGE.rglob("*.py")
    }
    graph = {}
    for name, f in names.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:  # `from package import module` names the module
                found |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module for a in node.names
                }
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = found & set(names) - {name}
    return graph


def test_no_module_imports_itself_back():
    graph = _module_imports()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        return seen

    assert not [m for m in sorted(graph) if m in reachable(m)]


# a file name or its suffix as a whole string ("grid.png"; ".md" after a formatted stem)
FILE_NAME = re.compile(r"([\w-][\w.-]*)?\.(png|json|csv|html|md|pt|onnx)")
REPORTS = sorted(f.name for f in (PACKAGE / "report").glob("*.py"))


@pytest.mark.parametrize("module", REPORTS)
def test_reports_spell_no_file_name_but_ask_the_layout(module: str):
    tree = ast.parse((PACKAGE / "report" / module).read_text())
    names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert not [name for name in names if FILE_NAME.fullmatch(name)]


ARCHITECTURE = (SRC.parent / "ARCHITECTURE.md").read_text()


def _units() -> list[str]:
    """The package's top-level modules and packages."""
    return sorted(
        {f.stem if f.parent == PACKAGE else f.relative_to(PACKAGE).parts[0] for f in PACKAGE.rglob("*.py")}
        - {"__init__", "__main__"}
    )


def test_architecture_md_import_table_is_the_codes():
    block = ARCHITECTURE.split("\nNow (")[1].split("```")[1]
    written = {
        unit.strip(): {d.strip() for d in deps.split(",")}
        for unit, deps in (row.split("->") for row in block.strip().splitlines())
    }
    actual = {unit: _imports(unit) - {unit} for unit in _units()}
    assert written == {unit: deps for unit, deps in actual.items() if deps}


def test_architecture_md_names_every_module():
    layout = ARCHITECTURE.split("```")[1]
    modules = [f for f in PACKAGE.rglob("*.py") if f.name not in ("__init__.py", "__main__.py")]
    assert not [str(f.relative_to(PACKAGE)) for f in modules if not re.search(rf"\b{re.escape(f.name)}", layout)]
