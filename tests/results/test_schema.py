import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from defungi.cli import main
from defungi.results.run import RunMetrics, read_run_metrics
from defungi.results.schema import SCHEMA_VERSION, SchemaError, from_dict, read_record, to_dict


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
