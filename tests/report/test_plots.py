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


def _ink_bands(path: Path) -> list[tuple[int, int]]:
    """The figure's bands of rows with something drawn in them (first row, row after the last), top down."""
    import numpy as np

    with Image.open(path) as image:
        ink = (np.asarray(image.convert("L")) < 200).any(axis=1)
    edges = np.flatnonzero(np.diff(np.r_[0, ink.astype(int), 0]))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def test_a_contact_sheet_has_its_title_right_above_its_captions_and_is_as_wide_as_its_thumbnails(tmp_path: Path):
    from defungi.report.plots import contact_sheet

    image = tmp_path / "H1_99a_1.jpg"
    Image.new("RGB", (40, 40), (128, 128, 128)).save(image)
    sheet = contact_sheet([image], ["H1 v=0.00"], tmp_path / "excluded.png")
    (_, title_end), (caption, caption_end), (thumb, _) = _ink_bands(sheet)[:3]
    assert caption - title_end <= 10 and thumb - caption_end <= 6  # no blank band between title, caption, image
    with Image.open(sheet) as drawn:
        assert drawn.width < 300  # one 1.3-inch column at 110 dpi, not the ten of a full row


def test_confidently_wrong_thumbnails_are_captioned_with_their_file_names(tmp_path: Path, monkeypatch):
    from defungi.report import run as report_run

    table = tmp_path / "predictions.csv"
    table.write_text(
        "path,sample,class,prediction,p_H1,p_H2\n"
        "/lab/H1/H1_1a_1.jpg,H1_1,H1,H2,0.30,0.70\n"
        "/lab/H1/H1_1a_2.jpg,H1_1,H1,H1,0.80,0.20\n"
        "/lab/H2/a_very_long_file_name_from_the_microscope_0001.tif,H2_1,H2,H1,0.90,0.10\n"
    )
    drawn = {}
    monkeypatch.setattr(report_run, "contact_sheet", lambda paths, captions, path, **_: drawn.update(c=captions))
    report_run.render_confident_errors(table, tmp_path / "confident_errors.png")
    assert drawn["c"] == ["a_very_long…ope_0001.tif\nH2->H1 0.90", "H1_1a_1.jpg\nH1->H2 0.70"]
