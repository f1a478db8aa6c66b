import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defungi.cli import main
from defungi.experiments.protocols import fit_run
from defungi.report.run import build_evaluation_report
from defungi.results.run import Evaluation, card_row, read_evaluation, read_run_metrics
from defungi.stats.metrics import calibration, mean_nll, temper
from tests.conftest import RICHER, TinyRun, tiny_config, write_folder


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


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of the richer tiny recipe: a model card with narrow intervals, sets at every level and a
    refusal detector."""
    root = tmp_path_factory.mktemp("learned")
    data = write_folder(root / "data", samples_per_class=40, patches=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFUNGI_CACHE", str(root / "cache"))
        fit_run(tiny_config(data, RICHER), root / "run")
    return root / "run"


def _evaluate(run: Path, data: Path, out: Path, *options: str) -> Evaluation:
    assert main(["evaluate", str(run), "--data", str(data), "--out", str(out), *options]) == 0
    return read_evaluation(out / "metrics.json")


def _outside_folder(root: Path) -> Path:
    """New micrographs filed under the wrong classes (H1's pattern in H2's folder...), and in each specimen
    a noise field besides its 3 micrographs (refused as not a micrograph)."""
    folder = write_folder(root, samples_per_class=3, patches=3, seed=23, classes=("H2", "H3", "H1"))
    rng = np.random.default_rng(3)
    for c in ("H1", "H2", "H3"):
        for s in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / c / f"{c}_{s + 1}a_9.png")
    return folder


def test_card_row_judges_each_side_by_the_intervals_combined():
    card = ("image accuracy", "two-sided", 0.655, [0.611, 0.692])
    lower = card_row(*card, 0.56, [0.50, 0.62])  # gap 0.095 > sqrt(0.0405^2 + 0.06^2) = 0.072
    assert lower.verdict == "outside"
    assert lower.line() == "image accuracy 0.560 [0.500, 0.620] against 0.655 [0.611, 0.692]"
    assert card_row(*card, 0.60, [0.54, 0.66]).verdict == "within"  # gap 0.055 < 0.072
    assert card_row(*card, 0.75, [0.70, 0.80]).verdict == "outside"  # higher counts too, for a score
    refused = ("refused", "at most", 0.012, [0.007, 0.017])
    assert card_row(*refused, 0.002, [0.0, 0.006]).verdict == "within"  # fewer refused is no breach
    assert card_row(*refused, 0.05, [0.03, 0.07]).verdict == "outside"
    coverage = ("sets at 90%, per specimen: coverage", "at least", 0.93, [0.90, 0.95])
    assert card_row(*coverage, 0.85, [0.80, 0.91], bound=0.9).verdict == "within"  # its interval reaches 0.9
    below = card_row(*coverage, 0.82, [0.76, 0.88], bound=0.9)
    assert below.verdict == "outside" and below.promise() == "at least 0.90 (held out: 0.930 [0.900, 0.950])"


def test_a_folder_like_the_training_one_is_within_the_card_at_every_level(
    learned: Path, tmp_path: Path, caplog, capsys
):
    new = write_folder(tmp_path / "new", samples_per_class=3, patches=3, seed=21)
    with caplog.at_level(logging.WARNING):
        evaluation = _evaluate(learned, new, tmp_path / "eval")
    trust = read_run_metrics(learned / "metrics.json").trust
    levels = [
        f"sets at {s.level:.0%}, per {s.unit}: coverage" for s in sorted(trust.sets, key=lambda s: (s.level, s.unit))
    ]
    scores = ["image accuracy", "image macro-F1", "specimen accuracy", "specimen macro-F1"]
    promises = [
        f"specimens answered at {p.target:.0%} target: {what}"
        for p, c in zip(trust.selective.promises, evaluation.promises, strict=True)
        for what, shown in (("accuracy", c.n_answered > 0), ("share", True))
        if shown
    ]
    refusals = ["refused as not a fungus micrograph", "flagged unlike the training specimens"]
    assert len(levels) == 4 and [r.figure for r in evaluation.card] == [*scores, *levels, *promises, *refusals]
    within = [r for r in evaluation.card if r.verdict == "within"]
    assert "outside the model card" not in caplog.text or len(within) < len(evaluation.card)
    assert {r.verdict for r in evaluation.card if not r.figure.startswith("specimens answered")} == {"within"}
    printed = capsys.readouterr().out
    assert "model card check:" in printed and "sets at 95%, per specimen: coverage" in printed
    page = (tmp_path / "eval" / "report.md").read_text()
    assert "## Model card check" in page and f"{len(evaluation.card)} figures" in page


def test_a_folder_outside_the_card_says_which_figures_in_a_warning(learned: Path, tmp_path: Path, caplog):
    with caplog.at_level(logging.WARNING):
        evaluation = _evaluate(learned, _outside_folder(tmp_path / "new"), tmp_path / "eval", "--coverage", "0.95")
    verdicts = {r.figure: r.verdict for r in evaluation.card}
    kept = {f for f in verdicts if not f.startswith("specimens answered at") and not f.startswith("flagged")}
    assert {f for f, v in verdicts.items() if v == "outside"} >= kept  # wrong classes, noise refused
    assert all(verdicts[f] == "outside" for f in verdicts if f.endswith("target: accuracy"))  # all wrong
    # every calibrated level is checked from the one pass, not only the level answers use (--coverage)
    assert evaluation.level == 0.95 and "sets at 90%, per image: coverage" in verdicts
    at_95 = {r.figure: r for r in evaluation.card}["sets at 95%, per specimen: coverage"]
    assert at_95.measured == evaluation.sets["specimen"].coverage and at_95.bound == 0.95
    refused = {r.figure: r for r in evaluation.card}["refused as not a fungus micrograph"]
    assert refused.measured == evaluation.ood.refused == 9 / (27 + 9)
    warnings = [r.getMessage() for r in caplog.records if "outside the model card" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(
        "this folder falls outside the model card: image accuracy 0.000"
    )
    assert "; refused as not a fungus micrograph" in warnings[0]
    outside = sum(v == "outside" for v in verdicts.values())
    assert (
        f"falls outside the model card on {outside} of {len(verdicts)} figures"
        in (tmp_path / "eval" / "report.md").read_text()
    )


def test_calibration_is_checked_per_unit_raw_and_calibrated(learned: Path, tmp_path: Path):
    new = write_folder(tmp_path / "new", samples_per_class=3, patches=3, seed=21)
    evaluation = _evaluate(learned, new, tmp_path / "eval")
    temperatures = read_run_metrics(learned / "metrics.json").trust.temperatures
    images = _table(tmp_path / "eval" / "predictions.csv")
    classes = evaluation.scores.classes
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in images])
    labels = np.array([classes.index(r["class"]) for r in images])
    check = evaluation.calibration["image"]
    assert check.n == len(images) == 27 and check.temperature == temperatures["image"].applied
    assert check.nll_raw == pytest.approx(mean_nll(probs, labels), abs=1e-6)
    calibrated = calibration(temper(probs, check.temperature), labels)
    assert check.calibrated.ece == pytest.approx(calibrated["ece"], abs=1e-6)
    # the temperature fitted on held-out specimens helps on new specimens like them
    assert check.calibrated.ece < check.raw.ece and check.nll_calibrated < check.nll_raw
    assert evaluation.calibration["specimen"].n == 9
    page = (tmp_path / "eval" / "report.md").read_text()
    for unit in ("image", "specimen"):
        assert (tmp_path / "eval" / f"reliability_{unit}.png").stat().st_size > 0
        assert f"(reliability_{unit}.png)" in page.split("## Calibration")[1]


def test_an_evaluation_written_before_the_card_check_still_reads_and_renders(tiny_run_copy: Path, tmp_path: Path):
    out = tmp_path / "eval"
    evaluation = _evaluate(tiny_run_copy, write_folder(tmp_path / "new", samples_per_class=2, patches=2), out)
    assert evaluation.card and set(evaluation.calibration) == {"image", "specimen"}
    older = json.loads((out / "metrics.json").read_text())
    del older["card"], older["calibration"]
    (out / "metrics.json").write_text(json.dumps(older))
    (out / "reliability_image.png").unlink()
    assert read_evaluation(out / "metrics.json").card == []
    build_evaluation_report(out)
    page = (out / "report.md").read_text()
    assert "## Scores" in page and "Model card check" not in page and "## Calibration" not in page
