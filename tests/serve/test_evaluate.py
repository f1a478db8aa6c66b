import csv
from pathlib import Path

from defungi.cli import main
from defungi.results.run import read_evaluation
from tests.conftest import TinyRun, write_folder


def _table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_answers_a_new_folder_as_a_lab_needs_it(tiny_run_copy: Path, tmp_path: Path, capsys):
    new = write_folder(tmp_path / "new", samples_per_class=3, patches=3, seed=21)
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_run_copy), "--data", str(new), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sets at 90%, per specimen: coverage" in printed and str(out / "report.html") in printed
    for name in ("metrics.json", "predictions.csv", "specimens.csv", "report.html", "report.md", "confusion.png",
                 "confusion_specimens.png", "confident_errors.png"):  # fmt: skip
        assert (out / name).exists(), name
    evaluation = read_evaluation(out / "metrics.json")
    images, specimens = _table(out / "predictions.csv"), _table(out / "specimens.csv")
    assert len(images) == evaluation.scores.n == 3 * 3 * 3 and len(specimens) == 3 * 3
    assert [Path(e["path"]).name for e in evaluation.excluded] == ["H1_99a_1.jpg"]  # the blank field
    decided = [s for s in specimens if s["right"]]
    assert evaluation.scores.samples.n == len(decided) == 9
    assert evaluation.scores.samples.accuracy == sum(s["right"] == "right" for s in decided) / 9
    assert evaluation.sets["specimen"].coverage == sum(s["in_set"] == "yes" for s in decided) / 9
    assert {r["set"] for r in images} and all(r["class"] in r["path"] for r in images)
    for r in images:  # the calibrated confidence beside the model's probability of the predicted class
        assert float(r["probability"]) == max(float(r[f"p_{c}"]) for c in ("H1", "H2", "H3"))
        assert 0 < float(r["confidence"]) <= 1
    assert all(0 < float(s["probability"]) <= 1 for s in decided)
    page = (out / "report.md").read_text()
    assert "Prediction sets" in page and "'one class': the share of sets that hold exactly one class" in page
    assert page.count("| level | unit | mode |") == 1 and "| 90% | specimen | as answered |" in page


def test_evaluate_groups_specimens_as_asked(tiny_run: TinyRun, tmp_path: Path, capsys):
    new = write_folder(tmp_path / "new", samples_per_class=2, patches=2, seed=22)
    out = tmp_path / "eval"
    args = ["evaluate", str(tiny_run.run), "--data", str(new), "--out", str(out), "--group-by", "folder", "--json"]
    assert main(args) == 0
    capsys.readouterr()
    assert read_evaluation(out / "metrics.json").scores.samples.n == 3  # one specimen per class folder
    assert main([*args[:-1], "--group-by", "(unclosed"]) == 2
    assert "not a regular expression" in capsys.readouterr().err


def test_report_writes_a_single_runs_page(tiny_run_copy: Path, capsys):
    assert main(["report", str(tiny_run_copy)]) == 0
    assert str(tiny_run_copy / "report.html") in capsys.readouterr().out
    page = (tiny_run_copy / "report.md").read_text()
    assert "How far its answers can be trusted" in page and "Selective answers" in page and "per specimen" in page
    # the sets of every level, unit and mode in one table, after the line that says what a set and 'one class' are
    assert page.count("| level | unit | mode |") == 1 and "'one class': the share of sets" in page
    table = page[page.index("| level | unit | mode |") :].split("\n\n")[0].splitlines()[2:]
    cells = [row.split(" | ")[:3] for row in table]
    assert [c[0].strip("| ") for c in cells[:4]] == ["90%"] * 4 and [c[0].strip("| ") for c in cells[4:]] == ["95%"] * 4
    assert sum(c[2].endswith("(answers)") for c in cells) == 4  # one mode answers per level and unit
    assert "| calibrated confidence at least |" in page
