import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from defungi.cli import main
from defungi.errors import DefungiError
from defungi.experiments.rundir import RunDir
from defungi.layout import read_history
from defungi.results.history import EpochRow
from defungi.results.run import Protocol, RunMetrics, Timing, read_run_metrics
from defungi.results.schema import GRID_SCHEMA_VERSION, SCHEMA_VERSION, SchemaError, from_dict, read_record, to_dict
from defungi.results.search import GridResult, GridRow, LearningCurve, read_curve, read_grid
from defungi.results.study import read_study


@dataclass
class Inner:
    value: float
    name: str | None = None


@dataclass
class Outer:
    count: int
    items: list[Inner]
    by_name: dict[str, Inner] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION


def test_a_record_round_trips_through_json_with_its_types():
    record = Outer(2, [Inner(1.5, "a"), Inner(2)], {"x": Inner(0.25)})
    data = json.loads(json.dumps(to_dict(record)))
    assert from_dict(Outer, data) == record
    assert from_dict(Inner, {"value": 3}).value == 3.0 and isinstance(from_dict(Inner, {"value": 3}).value, float)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": 1}, "Outer: unknown key 'extra'"),
        ({"count": "2"}, "Outer.count: expected int, found str"),
        ({"count": True}, "Outer.count: expected int, found bool"),
        ({"items": [{"value": "x"}]}, r"Outer.items\[0\].value: expected a number, found str"),
        ({"by_name": []}, "Outer.by_name: expected an object, found list"),
    ],
)
def test_a_bad_field_is_named(change: dict, message: str):
    data = {"count": 1, "items": []} | change
    with pytest.raises(SchemaError, match=message):
        from_dict(Outer, data)


def test_a_missing_key_is_named():
    with pytest.raises(SchemaError, match="Outer: missing key 'items'"):
        from_dict(Outer, {"count": 1})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "expected a JSON object, found list"),
        ('{"count": 1, "items": []}', "no schema_version"),
        ('{"count": 1, "items": [], "schema_version": 99}', "schema_version 99; this defungi reads schema_version 1"),
        ('{"count": 1, "schema_version": 1}', "missing key 'items'"),
    ],
)
def test_a_file_is_read_or_refused_in_one_line_naming_it(tmp_path: Path, text: str, message: str):
    path = tmp_path / "result.json"
    path.write_text(text)
    with pytest.raises(SchemaError, match=message) as info:
        read_record(Outer, path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_a_run_of_an_older_schema_is_refused_by_every_reader_in_one_line(tmp_path: Path, capsys):
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"model": "resnet34", "test": {"f1": 0.5}}))
    with pytest.raises(SchemaError, match="no schema_version"):
        read_run_metrics(run / "metrics.json")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"defungi: error: {run / 'metrics.json'}: no schema_version") and "\n" not in err


def test_run_metrics_name_their_kind_and_version():
    fields = RunMetrics.__dataclass_fields__
    assert fields["schema_version"].default == SCHEMA_VERSION and "kind" in fields


def test_a_run_config_of_another_version_is_refused_in_one_line(tmp_path: Path, capsys):
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"profile": "quick", "study": {"epochs": 6}}))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"defungi: error: {run / 'config.json'}: unknown config key 'study'") and "\n" not in err


EPOCHS = [
    EpochRow(1, 1e-3, 1.2, 0.5, 1.1, 0.45, 0.4, 300.0, 0.2),
    EpochRow(2, 5e-4, 0.9, 0.6, 1.0, 0.5, 0.5, 310.5, 0.2),
]
GRID_ROWS = [
    GridRow({"train.batch_size": 8, "train.lr": 0.001}, 0.5, [0.4, 0.6], 0.9, 0.55, 3.0),
    GridRow({"train.batch_size": 8, "train.lr": 0.002}, 0.6, [0.5, 0.7], 0.8, 0.6, 2.5),
]


def _curve() -> LearningCurve:
    rows = [[0.4, 0.5]]
    return LearningCurve([0.5, 1.0], 0, 1, [[4.0, 8.0]], rows, rows, rows, rows, rows, [[EPOCHS[:1], EPOCHS]])


def _grid() -> GridResult:
    return GridResult({"train.batch_size": [8], "train.lr": [0.001, 0.002]}, GRID_ROWS, GRID_ROWS[1].cell, 0.6, 0, 2,
                      "grid-0", 16)  # fmt: skip


@pytest.mark.parametrize("record", [EPOCHS[0], GRID_ROWS[0], _curve(), _grid()], ids=type)
def test_each_row_record_round_trips_through_json_typed(record):
    assert from_dict(type(record), json.loads(json.dumps(to_dict(record)))) == record


def test_a_curve_and_a_grid_file_are_read_back_as_records(tmp_path: Path):
    (tmp_path / "curve.json").write_text(json.dumps(to_dict(_curve())))
    (tmp_path / "grid.json").write_text(json.dumps(to_dict(_grid())))
    curve, grid = read_curve(tmp_path / "curve.json"), read_grid(tmp_path / "grid.json")
    assert curve == _curve() and all(isinstance(h, EpochRow) for fold in curve.histories for fit in fold for h in fit)
    assert grid == _grid() and isinstance(grid.rows[0], GridRow) and grid.rows[1].cell["train.lr"] == 0.002


@pytest.mark.parametrize(
    ("cls", "change", "message"),
    [
        (EpochRow, {"epoch": 1.5}, "EpochRow.epoch: expected int, found float"),
        (EpochRow, {"val_f1": "0.4"}, "EpochRow.val_f1: expected a number, found str"),
        (EpochRow, {"val_f2": 0.4}, "EpochRow: unknown key 'val_f2'"),
        (GridRow, {"cell": [8, 0.001]}, "GridRow.cell: expected an object, found list"),
        (GridRow, {"val_f1_interval": 0.4}, "GridRow.val_f1_interval: expected a list, found float"),
        (GridRow, {"train.lr": 0.001}, "GridRow: unknown key 'train.lr'"),  # a cell's value beside the scores
    ],
)
def test_a_row_record_with_a_wrong_type_or_an_unknown_key_is_refused(cls: type, change: dict, message: str):
    data = to_dict(EPOCHS[0] if cls is EpochRow else GRID_ROWS[0]) | change
    with pytest.raises(SchemaError, match=message):
        from_dict(cls, data)


def test_a_history_of_the_wrong_shape_is_refused_naming_the_epoch():
    curve = to_dict(_curve())
    curve["histories"][0][1][1]["lr"] = None
    with pytest.raises(
        SchemaError, match=r"LearningCurve.histories\[0\]\[1\]\[1\].lr: expected a number, found NoneType"
    ):
        from_dict(LearningCurve, curve)


def _version_1(name: str) -> dict:
    """grid.json, or a study.json holding a grid, as schema_version 1 wrote them: a row's cell values
    beside its scores."""
    grid = to_dict(_grid()) | {"schema_version": 1}
    grid["rows"] = [row.pop("cell") | row for row in grid["rows"]]
    if name == "grid.json":
        return grid
    step = {"kind": "grid", "summary": "", "choice": {}, "x_key": "train.lr", "y_key": "train.batch_size"}
    steps = {"grid20": {"title": "3. Grid", "seconds": 1.0, "result": step | {"result": grid}}}
    return {
        "study": "s",
        "model": "m",
        "published": {},
        "config": {},
        "options": {},
        "steps": steps,
        "schema_version": 1,
    }


@pytest.mark.parametrize(("name", "read"), [("grid.json", read_grid), ("study.json", read_study)])
def test_a_grid_of_schema_version_1_is_refused_in_one_line(tmp_path: Path, name: str, read):
    path = tmp_path / name
    path.write_text(json.dumps(_version_1(name)))
    with pytest.raises(
        SchemaError, match=f"schema_version 1; this defungi reads schema_version {GRID_SCHEMA_VERSION}"
    ) as info:
        read(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    assert GRID_SCHEMA_VERSION == 2 and SCHEMA_VERSION == 1  # curve.json, metrics.json and checkpoints stay at 1


def _metrics() -> RunMetrics:
    protocol = Protocol("grouped", 0, 16, 0.0, 0, {"train": 8}, {"train": 4}, False, "float32", 0.0, 1, 1, 0)
    return RunMetrics(
        "fit", "convmixer", {}, ["H1", "H2"], protocol, 1000, Timing(0.4, 2), [2], "epoch budget used", {}
    )


def test_history_csv_keeps_its_columns_and_is_read_back_typed(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    run.prepare()
    run.write_result(EPOCHS, _metrics())
    header = (tmp_path / "run" / "history.csv").read_text().splitlines()[0]
    assert header == "epoch,lr,train_loss,train_accuracy,val_loss,val_accuracy,val_f1,images_per_s,seconds"
    assert read_history(tmp_path / "run" / "history.csv") == EPOCHS == run.finished().history
    run.write_result([], _metrics())  # a run of several fits keeps its histories in its parts
    assert read_history(tmp_path / "run" / "history.csv") == []


def test_a_history_csv_with_an_unknown_column_is_refused_in_one_line(tmp_path: Path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,lr,train_loss,train_accuracy,val_loss,val_accuracy,val_f1,images_per_s,seconds,extra\n"
                    "1,0.001,1.2,0.5,1.1,0.45,0.4,300.0,0.2,7\n")  # fmt: skip
    with pytest.raises(DefungiError, match="history.csv: not the table defungi wrote .*unknown key 'extra'") as info:
        read_history(path)
    assert "\n" not in str(info.value)
