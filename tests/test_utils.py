import os
from pathlib import Path

from defungi.utils import atomic_write_json, atomic_write_text


def test_atomic_writes_replace_whole_files_with_the_usual_permissions(tmp_path: Path):
    path = tmp_path / "sub" / "report.md"
    atomic_write_text(path, "first")
    atomic_write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
