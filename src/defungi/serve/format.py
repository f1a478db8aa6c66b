"""What `defungi predict` prints: its rows (per image, or per specimen followed by its images) as
an aligned table, CSV or JSON. Display only; the rows come from `serve.predict`."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from defungi.report.page import metrics_line
from defungi.serve.predict import Predictions


def format_predictions(result: Predictions, fmt: str) -> str:
    """The predictions as fmt (table, csv or json), ending with a newline."""
    return {"table": as_table, "csv": as_csv, "json": as_json}[fmt](result)


def as_json(result: Predictions) -> str:
    """The image rows; with specimens, the specimens (each holding its image rows) and their metrics."""
    obj = result.rows if result.specimens is None else {"specimens": result.specimens, "metrics": result.metrics}
    return json.dumps(obj, indent=2) + "\n"


def as_csv(result: Predictions) -> str:
    """One line per specimen and per image, a column per class; blank cells where a row has no value."""
    out = io.StringIO()
    writer = csv.writer(out)
    keys = ("path", "label", "class", "decision", "confidence", *result.classes)
    writer.writerow(["level", "specimen", *keys, "status"])
    for level, specimen, r in _levels(result):
        cells = (r.get(k) for k in keys)
        writer.writerow([level, specimen, *("" if c is None else c for c in cells), _status(r)])
    return out.getvalue()


def as_table(result: Predictions) -> str:
    """Aligned columns (a specimen's images indented under it), then the specimens' metrics if any."""
    classes, nested = result.classes, result.specimens is not None
    width = max(len(r["path"]) for r in result.rows) + 2
    lines = [f"{'path':<{width}}  {'decision':>9}  {'conf':>5}  " + "  ".join(f"{c:>6}" for c in classes)]
    for level, _, r in _levels(result):
        name = r["path"] if level != "specimen" else r["specimen"]
        name = f"  {name}" if level == "image" and nested else name
        if "class" in r:
            probs = "  ".join(f"{r[c]:6.3f}" for c in classes)
            lines.append(f"{name:<{width}}  {r['decision']:>9}  {r['confidence']:5.2f}  {probs}{_count(r)}")
        else:
            lines.append(f"{name:<{width}}  {_status(r)}{_count(r)}")
    if result.metrics is not None:
        lines.append(metrics_line(f"per specimen ({result.metrics['n']} with a known class)", result.metrics))
    return "\n".join(lines) + "\n"


def _levels(result: Predictions) -> list[tuple[str, str, dict[str, Any]]]:
    """(level, specimen, row): every image, or every specimen followed by its images."""
    if result.specimens is None:
        return [("image", "", r) for r in result.rows]
    return [
        (lvl, s["specimen"], r)
        for s in result.specimens
        for lvl, r in [("specimen", s), *(("image", r) for r in s["rows"])]
    ]


def _status(row: dict[str, Any]) -> str:
    """Why a row has no class: its error, or 'no fungus visible'."""
    return row.get("error") or row.get("status") or ""


def _count(row: dict[str, Any]) -> str:
    """For a specimen: how many of its images decided it."""
    if "images" not in row:
        return ""
    fungus = f", {row['no_fungus']} with no fungus visible" if row["no_fungus"] else ""
    return f"  ({row['classified']} of {row['images']} images{fungus})"
