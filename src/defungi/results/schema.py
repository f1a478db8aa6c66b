"""Typed result records as JSON: dataclasses in, dataclasses out, with a schema version.

A record class lists its fields with types; `from_dict` builds it back from parsed JSON,
checking every field's type, refusing unknown and missing keys, so that no reader has to guess
which keys a file holds. A file's record names the schema_version it is written in (its field's
default); a file of another version is refused in one line. No torch here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from defungi.errors import DefungiError

SCHEMA_VERSION = 1  # of metrics.json, evaluations, checkpoints, curve.json, plan.json and audit.json
GRID_SCHEMA_VERSION = 2  # of grid.json and study.json (which holds grids): 2 since a grid row holds its cell in 'cell'
T = TypeVar("T")


class SchemaError(DefungiError):
    """A results file that this version cannot read (another version, broken or foreign content)."""


def to_dict(record: Any) -> dict[str, Any]:
    """A record as plain JSON-able data (nested records too)."""
    return dataclasses.asdict(record)


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """The record of class cls held in data (parsed JSON); a SchemaError names the first bad field."""
    return _build(cls, data, where or cls.__name__)


def _build(kind: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tagged = _tagged(args, value, where)
        if tagged is not None:
            return _record(tagged, value, where)
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _build(option, value, where)
            except SchemaError as exc:
                errors.append(str(exc))
        raise SchemaError(errors[0])
    if dataclasses.is_dataclass(kind):
        return _record(kind, value, where)
    if origin is list:
        _expect(isinstance(value, list), "a list", value, where)
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _expect(isinstance(value, dict), "an object", value, where)
        return {k: _build(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        _expect(value in args, f"one of {', '.join(map(str, args))}", value, where)
        return value
    if kind is float:
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), "a number", value, where)
        return float(value)
    _expect(isinstance(value, kind) and not (kind is int and isinstance(value, bool)), kind.__name__, value, where)
    return value


def _tagged(options: tuple[Any, ...], value: Any, where: str) -> type | None:
    """The member of a union of tagged records (each names itself in a Literal `kind` field) that value's
    kind names; None for any other union, whose members are tried in turn."""
    kinds: dict[Any, type] = {}
    for option in (o for o in options if o is not type(None)):
        tag = _hints(option).get("kind") if dataclasses.is_dataclass(option) else None
        if typing.get_origin(tag) is not typing.Literal:
            return None
        kinds |= dict.fromkeys(typing.get_args(tag), option)
    _expect(isinstance(value, dict), "an object", value, where)
    if value.get("kind") not in kinds:
        raise SchemaError(f"{where}.kind: expected one of {', '.join(kinds)}, found {value.get('kind')!r}")
    return kinds[value["kind"]]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A record class's field types, resolved once per process (a transfer CV's metrics.json holds about
    a thousand records: reading it took 9.7-11.3 ms resolving them each time, 3.5 ms so)."""
    return typing.get_type_hints(cls)


def _record(cls: type, value: Any, where: str) -> Any:
    _expect(isinstance(value, dict), "an object", value, where)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(value.keys() - fields.keys())
    if unknown:
        raise SchemaError(f"{where}: unknown key {unknown[0]!r}")
    missing = [
        n
        for n, f in fields.items()
        if n not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SchemaError(f"{where}: missing key {missing[0]!r}")
    return cls(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()})


def _expect(ok: bool, what: str, value: Any, where: str) -> None:
    if not ok:
        raise SchemaError(f"{where}: expected {what}, found {type(value).__name__}")


def read_record(cls: type[T], path: Path) -> T:
    """The versioned record of class cls in a JSON file, or one line naming the file and what is wrong
    (not JSON, another schema version than the one cls writes, a bad field)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SchemaError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{path}: not a readable JSON file ({type(exc).__name__}); delete it and run again") from None
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: expected a JSON object, found {type(data).__name__}; delete it and run again")
    check_version(data.get("schema_version"), path, getattr(cls, "schema_version", SCHEMA_VERSION))
    try:
        return from_dict(cls, data)
    except SchemaError as exc:
        raise SchemaError(f"{path}: {exc}; delete it and run again") from None


def check_version(version: Any, source: Path | str, expected: int = SCHEMA_VERSION) -> None:
    """Refuse, in one line, a file written under another results schema than expected (none: before versions)."""
    if version != expected:
        found = (
            "no schema_version (written before defungi versioned its results)"
            if version is None
            else (f"schema_version {version}")
        )
        raise SchemaError(
            f"{source}: {found}; this defungi reads schema_version {expected}: train or run it again "
            "into a new folder (or use the defungi version that wrote it)"
        )
