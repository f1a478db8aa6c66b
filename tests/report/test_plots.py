"""Figures written whole, whoever else draws the same one at the same time."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import SRC

DRAW = """
import sys
from pathlib import Path
from defungi.report.plots import plot_confusion
for _ in range(25):
    plot_confusion([[3, 1], [0, 4]], ["H1", "H2"], Path(sys.argv[1]))
"""


def test_two_processes_drawing_one_figure_at_once_each_write_it_whole(tmp_path: Path):
    path = tmp_path / "confusion.png"
    env = {"PYTHONPATH": str(SRC), "MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin"}
    drawers = [subprocess.Popen([sys.executable, "-c", DRAW, str(path)], env=env, stderr=subprocess.PIPE) for _ in "ab"]
    for drawer in drawers:
        _, err = drawer.communicate(timeout=300)
        assert drawer.returncode == 0, err.decode()[-2000:]
    with Image.open(path) as image:
        image.load()  # a whole PNG
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"]  # no temporary file left behind
