import json
from pathlib import Path

import pytest

from defungi.cli import main
from defungi.report.study import RENDERERS, renders
from defungi.results.history import EpochRow
from defungi.results.run import (
    ClassScores,
    Confusion,
    Difference,
    FoldScores,
    PairedDifference,
    PartScores,
    Scores,
    Timing,
)
from defungi.results.schema import GRID_SCHEMA_VERSION, SchemaError, to_dict
from defungi.results.search import GridResult, GridRow, LearningCurve
from defungi.results.study import (
    STEP_RESULTS,
    ClassCounts,
    Comparison,
    Curves,
    Depth,
    DepthRow,
    Final,
    FitSummary,
    Grid,
    NamedCurve,
    SplitRatio,
    StepRecord,
    StudyState,
    read_study,
)

HISTORY = [
    EpochRow(1, 1e-3, 1.2, 0.5, 1.1, 0.45, 0.4, 300.0, 0.2),
    EpochRow(2, 5e-4, 0.9, 0.6, 1.0, 0.5, 0.5, 310.0, 0.2),
]


def _scores(f1: float) -> PartScores:
    table = {
        "n": 12,
        "accuracy": 0.6,
        "precision": 0.55,
        "recall": 0.5,
        "f1": f1,
        "per_class": {"H1": ClassScores(0.5, 0.6, 0.55, 6), "H2": ClassScores(0.7, 0.4, 0.5, 6)},
        "confusion_matrix": [[4, 2], [3, 3]],
        "most_confused": [Confusion("H2", "H1", 3, 0.5)],
        "classes": ["H1", "H2"],
        "absent_classes": [],
        "intervals": {"f1": [f1 - 0.1, f1 + 0.1]},
    }
    return PartScores(**table, samples=Scores(**table | {"n": 4}), loss=0.8, tta=False)


def _curve() -> LearningCurve:
    rows = [[0.4, 0.5]]
    return LearningCurve([0.5, 1.0], 0, 1, [[4.0, 8.0]], rows, rows, rows, rows, rows, [[HISTORY, HISTORY]])


def every_result() -> list:
    """One result of every step result type, filled as a study fills it."""
    row = GridRow({"train.batch_size": 8, "train.lr": 0.001}, 0.5, [0.4, 0.6], 0.9, 0.55, 3.0)
    grid = GridResult({"train.lr": [0.001]}, [row], {"train.lr": 0.001}, 0.5, 0, 1, "grid-0", 8)
    gap = PairedDifference({"f1": Difference(0.1, [0.02, 0.2])}, {"f1": Difference(0.05, [-0.1, 0.2])}, 12, 4)
    fold = FoldScores(0, 6, 2, 0.6, 0.55, 0.5, 0.5, 0.5, 0.5)
    return [
        ClassCounts(summary="counts", counts={"before": {"H1": 3, "H2": 9}, "after": {"H1": 6, "H2": 6}}),
        Curves(summary="curves", curves={"20% of the data": NamedCurve("validation set", 12, _curve())}),
        Grid(summary="grid", choice={"train.lr": 0.001}, x_key="train.lr", y_key="train.batch_size", result=grid),
        FitSummary(summary="fit", label="base model", test=_scores(0.5), history=HISTORY),
        Comparison(
            summary="comparison", val={"basic": _scores(0.5), "strong": _scores(0.6)}, histories={"basic": HISTORY}
        ),
        SplitRatio(
            summary="ratios",
            ratios=[0.75],
            labels=["75/25 (test 25.0%)"],
            scores=[[0.5]],
            test_sizes=[[3]],
            images=12,
            intervals=[[[0.4, 0.6]]],
        ),
        Depth(summary="depth", rows=[DepthRow(8, 0.5, [0.4, 0.6], 0.55, 0.002, 0.5)]),
        Final(
            summary="final",
            runs={"grouped": "07-final/grouped"},
            test={"grouped": _scores(0.5)},
            folds={"grouped": [fold]},
            gap=gap,
            timing={"grouped": Timing(10.0, 2)},
            parameters=1000,
            cv_folds=2,
            inference_images_per_s=100.0,
        ),
    ]


def _state() -> StudyState:
    steps = {f"step{i}": StepRecord(f"{i}. {type(r).__name__}", 1.5, r) for i, r in enumerate(every_result())}
    options = {"epochs": 1, "final_folds": 2, "config": {"train.ensemble": 2}}
    return StudyState("convmixer", "convmixer-8", {"f1": 0.8}, {"profile": "quick"}, options, steps)


def test_every_step_result_type_is_in_a_study_file():
    assert sorted(type(r).__name__ for r in every_result()) == sorted(t.__name__ for t in STEP_RESULTS)


def test_a_study_file_round_trips_with_every_result_typed(tmp_path: Path):
    state = _state()
    path = tmp_path / "study.json"
    path.write_text(json.dumps(to_dict(state)))
    data = json.loads(path.read_text())
    assert data["schema_version"] == GRID_SCHEMA_VERSION  # it holds grids
    assert [s["result"]["kind"] for s in data["steps"].values()] == [
        "class_counts", "curves", "grid", "fit", "comparison", "split_ratio", "depth", "final"
    ]  # fmt: skip
    back = read_study(path)
    assert back == state
    assert isinstance(back.steps["step1"].result.curves["20% of the data"].curve, LearningCurve)
    assert back.result(Final) == state.steps["step7"].result and back.result(Depth).rows[0].depth == 8
    assert back.explore_epochs == 1


def test_the_kind_picks_the_result_class_and_an_unknown_kind_is_named(tmp_path: Path):
    data = to_dict(_state())
    data["steps"]["step3"]["result"]["kind"] = "grid"  # a FitSummary's fields under the kind of a Grid
    path = tmp_path / "study.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SchemaError, match="steps.step3.result: unknown key 'history'"):
        read_study(path)
    data["steps"]["step3"]["result"]["kind"] = "histogram"
    path.write_text(json.dumps(data))
    with pytest.raises(
        SchemaError, match="steps.step3.result.kind: expected one of class_counts, .*, found 'histogram'"
    ):
        read_study(path)


OLD_STUDY = {  # study.json as defungi wrote it before the results had a schema version
    "format": 3,
    "study": "resnet34",
    "model": "resnet34",
    "published": {"f1": 0.79},
    "config": {},
    "steps": {
        "balance": {"kind": "class_counts", "summary": "s", "choice": {}, "counts": {}, "title": "1.", "seconds": 1}
    },
}


def test_a_study_folder_of_before_the_schema_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    folder = tmp_path / "study-resnet34"
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps(OLD_STUDY))
    with pytest.raises(SchemaError, match="no schema_version"):
        read_study(folder / "study.json")
    for argv in (["report", str(folder)], ["report", "--studies", str(folder), "--out", str(tmp_path / "page")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"defungi: error: {folder / 'study.json'}: no schema_version") and "\n" not in err


def test_every_step_result_type_has_exactly_one_renderer():
    assert set(RENDERERS) == set(STEP_RESULTS)
    with pytest.raises(ValueError, match="Curves has a renderer already"):
        renders(Curves)(lambda result, step: ([], []))
