"""benchmarks/architecture.py on a tiny generated package: the lengths, what train's calls reach and
how often they cross layers (down, and back up through a handed callback or an override), the
results read by key, and the README's lines, each counted exactly."""

import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ARCHITECTURE = Path(__file__).resolve().parents[1] / "benchmarks" / "architecture.py"
TREE = {
    "__init__.py": "",
    "errors.py": "class DefungiError(Exception):\n    pass\n",
    "utils.py": "def retry(fn):\n    return fn()\n",
    "cli.py": """
        from defungi.errors import DefungiError


        def cmd_train(args):
            from defungi.jobs import train_job

            if not args:
                raise DefungiError("no args")
            return train_job(args)


        def cmd_report(args):
            from defungi.report.page import draw

            return draw(args)
        """,
    "jobs.py": """
        from defungi.experiments.fit import Fitter


        def train_job(config):
            fitter = Fitter(config)
            return fitter.fit()
        """,
    "experiments/__init__.py": "",
    "experiments/fit.py": """
        from defungi.train import loop
        from defungi.train.loop import Loop, epoch


        class MyLoop(Loop):
            def hook(self):
                return 1


        class Fitter:
            def __init__(self, config):
                self.config = config

            def fit(self):
                loop.step(self._row)  # a method handed down: train calls it back
                MyLoop().run()  # train's run calls back this package's override of hook
                return epoch(lambda: 1) + self.score()  # a lambda handed down

            def score(self):
                return {"a": 1}["a"]

            def _row(self):
                return 0
        """,
    "train/__init__.py": "",
    "train/loop.py": """
        from defungi.utils import retry


        class Loop:
            def run(self):
                return self.hook()

            def hook(self):
                return 0


        def step(callback):
            return retry(callback)


        def epoch(callback):
            return callback()
        """,
    "report/__init__.py": "",
    "report/page.py": """
        def draw(record):
            title = record["title"]
            rows = record["rows"]
            return title, rows
        """,
    "results/__init__.py": "",
    "results/run.py": 'def kind(record):\n    return record["kind"]\n',
}


def _architecture() -> ModuleType:
    spec = importlib.util.spec_from_file_location("architecture", ARCHITECTURE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A tiny defungi: cli -> jobs -> experiments -> train -> utils, and a report that train never reaches."""
    package = tmp_path / "src" / "defungi"
    for name, text in TREE.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(textwrap.dedent(text).lstrip())
    (tmp_path / "README.md").write_text("# defungi\n\nA tiny one.\n")
    return package


def test_lengths(src: Path):
    arch = _architecture()
    modules = arch.read_modules(src)
    assert arch.longest_modules(modules, src, top=2) == [("experiments/fit.py", 23), ("train/loop.py", 17)]
    assert arch.longest_functions(modules, src, top=3) == [
        ("cmd_train", "cli.py:4", 6),
        ("cmd_report", "cli.py:12", 4),  # ties by file and line
        ("Fitter.fit", "experiments/fit.py:14", 4),
    ]


def test_what_train_reaches_and_how_often_it_climbs_back_up(src: Path):
    arch = _architecture()
    modules = arch.read_modules(src)
    start = arch.top_level_imports(modules["defungi.cli"], modules)
    assert start == {"defungi.errors"}
    entry = arch.Index(modules).node("defungi.cli:cmd_train")
    closure = arch.import_closure(modules, start | arch.imported(modules, entry, "defungi.cli"))
    assert sorted(closure) == [
        "defungi.errors",
        "defungi.experiments.fit",
        "defungi.jobs",
        "defungi.train.loop",
        "defungi.utils",
    ]  # report.page is imported by another command only

    walk = arch.walk_calls(arch.Index(modules), "defungi.cli:cmd_train")
    assert sorted(walk.sites) == [
        "defungi.cli:cmd_train",
        "defungi.errors:DefungiError",
        "defungi.experiments.fit:Fitter",
        "defungi.experiments.fit:Fitter.__init__",
        "defungi.experiments.fit:Fitter._row",
        "defungi.experiments.fit:Fitter.fit",
        "defungi.experiments.fit:Fitter.score",
        "defungi.experiments.fit:MyLoop",
        "defungi.experiments.fit:MyLoop.hook",
        "defungi.jobs:train_job",
        "defungi.train.loop:Loop.hook",
        "defungi.train.loop:Loop.run",
        "defungi.train.loop:epoch",
        "defungi.train.loop:step",
        "defungi.utils:retry",
    ]
    assert dict(walk.crossings) == {
        ("cli", "errors"): 1,
        ("cli", "jobs"): 1,
        ("jobs", "experiments"): 2,  # Fitter(...) and fitter.fit()
        ("experiments", "train"): 3,  # step, Loop.run, epoch
        ("train", "experiments"): 3,  # _row and the lambda called back, MyLoop.hook as an override
        ("train", "utils"): 1,
    }
    assert sorted(walk.climbs) == [
        ("defungi.experiments.fit:Fitter.fit", "train", "defungi.experiments.fit:Fitter._row"),
        ("defungi.experiments.fit:Fitter.fit", "train", "defungi.experiments.fit:Fitter.fit"),  # its lambda
        ("defungi.train.loop:Loop.run", "train", "defungi.experiments.fit:MyLoop.hook"),
    ]


def test_keys_read_outside_results_and_the_whole_report(src: Path):
    arch = _architecture()
    assert arch.key_reads(arch.read_modules(src)) == {"report": 2, "experiments": 1}  # results/ left out
    text = arch.report(src, src.parent.parent / "README.md")
    assert "- imported, transitively: 6 modules\n" in text  # the closure and cli itself
    assert "- reached by its calls: 6 modules, 15 functions and classes\n" in text
    assert "- calls down into a lower layer (each climbs back up on its return): 8\n" in text
    assert "- calls that climb back up (a lower layer calling a function of a higher one): 3\n" in text
    assert "- experiments -> train: 3 calls; train -> experiments: 3 calls\n" in text
    assert "| experiments.fit | experiments | 7 |" in text
    assert "| report | 2 |" in text
    assert text.endswith("## README.md: 3 lines")
