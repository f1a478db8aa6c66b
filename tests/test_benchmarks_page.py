"""benchmarks/record.py on a temporary benchmarks folder with fake scripts (no real benchmark runs): a
result stamped with its command, date, commit and CPU, and the page built from the results."""

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from defungi.utils import cpu_flags

RECORD = Path(__file__).resolve().parents[1] / "benchmarks" / "record.py"
FAKE = """\"\"\"A fake benchmark that prints one line.

Usage: not on the page.
\"\"\"

import sys

print("fake figure:", *sys.argv[1:])
"""


def _record() -> ModuleType:
    spec = importlib.util.spec_from_file_location("record", RECORD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(repo: Path, *args: str) -> str:
    who = ["-c", "user.name=test", "-c", "user.email=test@example.org", "-c", "commit.gpgsign=false"]
    return subprocess.run(["git", *who, *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git checkout holding benchmarks/fake.py (prints a line) and benchmarks/other.py (never recorded)."""
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "fake.py").write_text(FAKE)
    (bench / "other.sh").write_text("#!/usr/bin/env bash\n# Another benchmark, never recorded.\n#\n# usage\necho\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "fake benchmarks")
    return tmp_path


def test_a_recorded_result_carries_its_stamp_and_the_page_its_section(repo: Path, capsys):
    head = _git(repo, "rev-parse", "--short", "HEAD")
    assert _record().main(["--benchmarks", str(repo / "benchmarks"), "fake", "--size", "3"]) == 0
    assert "fake figure: --size 3" in capsys.readouterr().out  # streamed as it ran
    result = (repo / "benchmarks" / "results" / "fake.md").read_text()
    assert "- command: `python benchmarks/fake.py --size 3`\n" in result
    assert f"- commit: {head}\n" in result  # the tree was clean when it started
    assert f"- CPU flags: {cpu_flags()}\n" in result
    assert re.search(r"- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC\n", result)
    assert re.search(r"- threads: \d+ ", result)
    assert "```text\nfake figure: --size 3\n```" in result
    assert [p.name for p in (repo / "benchmarks" / "results").iterdir()] == ["fake.md"]  # no temporary left

    page = (repo / "docs" / "benchmarks.md").read_text()
    assert page.startswith("# Benchmarks\n")
    fake = page.split("## fake\n")[1].split("\n## ")[0]
    assert "`benchmarks/fake.py`: A fake benchmark that prints one line." in fake
    assert "Usage" not in fake  # the docstring's first paragraph only
    assert f"- commit: {head}" in fake and "fake figure: --size 3" in fake
    other = page.split("## other\n")[1]
    assert "`benchmarks/other.sh`: Another benchmark, never recorded." in other
    assert "not recorded yet: run `python benchmarks/record.py other ...`" in other
    assert "## record" not in page


def test_a_change_not_committed_marks_the_commit_dirty(repo: Path):
    record, head = _record(), _git(repo, "rev-parse", "--short", "HEAD")
    assert record.commit(repo) == head
    (repo / "benchmarks" / "notes.txt").write_text("uncommitted\n")
    assert record.commit(repo) == f"{head}+dirty"


def test_a_failed_benchmark_records_nothing(repo: Path, capsys):
    (repo / "benchmarks" / "broken.py").write_text('"""Fails."""\n\nraise SystemExit(3)\n')
    assert _record().main(["--benchmarks", str(repo / "benchmarks"), "broken"]) == 3
    assert not (repo / "benchmarks" / "results" / "broken.md").exists()
    page = (repo / "docs" / "benchmarks.md").read_text()
    assert "not recorded yet: run `python benchmarks/record.py broken ...`" in page


def test_page_alone_runs_nothing(repo: Path, capsys):
    assert _record().main(["--benchmarks", str(repo / "benchmarks"), "--page"]) == 0
    assert "fake figure" not in capsys.readouterr().out
    page = (repo / "docs" / "benchmarks.md").read_text()
    assert "not recorded yet: run `python benchmarks/record.py fake ...`" in page
    assert not (repo / "benchmarks" / "results").exists()
