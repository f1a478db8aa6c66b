"""A run's and an evaluation's pages show the images they did not answer: those refused as not fungus
micrographs (refused.png, only when there are any) and those left out (excluded.png), each with its
file name and why, with its figure."""

import csv
import json
from pathlib import Path

import pytest

from defungi.cli import main
from defungi.report import run as report_run
from defungi.report.run import build_evaluation_report, build_run_report, exclusion_caption
from defungi.results.ood import OodCheck
from defungi.results.schema import to_dict


def _table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _refusing(folder: Path, table: Path, scores: list[float], source: str = "test") -> None:
    """Give a folder's metrics.json a refusal check (over 1.5: refused) and its predictions table these
    scores, as a run or evaluation with a refusal detector writes them."""
    rows = [r | {"ood": f"{s:.4f}"} for r, s in zip(_table(table), scores, strict=True)]
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    refused = sum(s > 1.5 for s in scores) / len(rows)
    check = OodCheck(source, 0.99, [1.0], len(rows), refused, [0.0, 1.0], refuse_over=1.5)
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps(metrics | {"ood": to_dict(check)}))


def _captions(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The captions of every contact sheet drawn from now on, by figure name (the sheets still drawn)."""
    drawn: dict[str, list[str]] = {}
    sheet = report_run.contact_sheet

    def recorded(paths, captions, path, **kwargs):
        drawn[Path(path).stem] = list(captions)
        return sheet(paths, captions, path, **kwargs)

    monkeypatch.setattr(report_run, "contact_sheet", recorded)
    return drawn


def test_the_run_page_shows_the_held_out_images_refused_and_none_when_none_were(
    tiny_run_copy: Path, monkeypatch: pytest.MonkeyPatch
):
    run = tiny_run_copy
    rows = len(_table(run / "predictions_test.csv"))
    _refusing(run, run / "predictions_test.csv", [0.4, 2.31, 1.2, 3.05] + [0.5] * (rows - 4))
    captions = _captions(monkeypatch)
    build_run_report(run)
    page = (run / "report.md").read_text()
    assert (run / "refused.png").exists() and "(refused.png)" in page
    names = [Path(r["path"]).name for r in _table(run / "predictions_test.csv")]
    assert captions["refused"] == [f"{names[3]}\nrefusal score 3.05", f"{names[1]}\nrefusal score 2.31"]
    assert (
        "Not answered: held-out images (test) refused as not a fungus micrograph (refusal score over 1.5): 2, "
        "shown in refused.png; images left out before training (unreadable, or grey variance under 15: no fungus "
        "visible): 1, shown in excluded.png." in page
    )
    assert captions["excluded"] == ["H1_99a_1.jpg\nno fungus visible,\nv=0.00 < 15"]  # the blank field
    (run / "refused.png").unlink()
    _refusing(run, run / "predictions_test.csv", [0.4, 1.2] + [0.5] * (rows - 2))  # flagged, none refused
    build_run_report(run)
    page = (run / "report.md").read_text()
    assert not (run / "refused.png").exists() and "refused.png" not in page
    assert "refused as not a fungus micrograph (refusal score over 1.5): none;" in page


def test_a_run_without_a_refusal_detector_says_only_what_it_left_out(tiny_run_copy: Path):
    build_run_report(tiny_run_copy)
    page = (tiny_run_copy / "report.md").read_text()
    line = next(line for line in page.splitlines() if line.startswith("Not answered:"))
    assert "refused" not in line and "images left out before training" in line
    assert not (tiny_run_copy / "refused.png").exists()


def test_a_left_out_image_is_captioned_with_its_name_and_why():
    blank = {"path": "/lab/H1/H1_99a_1.jpg", "label": "H1", "grey_variance": "14.23",
             "reason": "grey variance under 20"}  # fmt: skip
    broken = {"path": "/lab/H2/a_very_long_file_name_from_the_microscope.tif", "label": "H2", "grey_variance": "",
              "reason": "UnidentifiedImageError: cannot identify image file '/lab/H2/...'"}  # fmt: skip
    assert exclusion_caption(blank, 20.0) == "H1_99a_1.jpg\nno fungus visible,\nv=14.23 < 20"
    assert exclusion_caption(blank, None) == "H1_99a_1.jpg\nno fungus visible,\nv=14.23"  # threshold not recorded
    assert exclusion_caption(broken, 20.0) == "a_very_long…croscope.tif\nunreadable\n(UnidentifiedImageError)"


def test_the_evaluation_page_shows_the_images_refused_and_left_out(
    tiny_run_copy: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_run_copy), "--data", str(tiny_data), "--out", str(out)]) == 0
    rows = len(_table(out / "predictions.csv"))
    _refusing(out, out / "predictions.csv", [1.9] + [0.3] * (rows - 1), source="evaluation")
    captions = _captions(monkeypatch)
    build_evaluation_report(out)
    page = (out / "report.md").read_text()
    refused = _table(out / "predictions.csv")[0]
    assert captions["refused"] == [f"{Path(refused['path']).name}\nrefusal score 1.90"]
    assert captions["excluded"] == ["H1_99a_1.jpg\nno fungus visible,\nv=0.00 < 15"]
    assert (
        "Not answered: images refused as not a fungus micrograph (refusal score over 1.5): 1, shown in refused.png; "
        "images left out (unreadable, or no fungus visible): 1, shown in excluded.png." in page
    )
    assert "![refused.png](refused.png)" in page and "![excluded.png](excluded.png)" in page
