"""What `defungi predict` prints: its rows (per image, or per specimen followed by its images) as
an aligned table, CSV or JSON. Display only; the answers come from `serve.predict`."""

from __future__ import annotations

import csv
import io
import json

from defungi.report.page import metrics_line
from defungi.results.answers import ImageAnswer, SpecimenAnswer
from defungi.results.schema import to_dict
from defungi.serve.predict import Predictions, reason


def format_predictions(result: Predictions, fmt: str) -> str:
    """The predictions as fmt (table, csv or json), ending with a newline."""
    return {"table": as_table, "csv": as_csv, "json": as_json}[fmt](result)


def as_json(result: Predictions) -> str:
    """The images' answers; with specimens, the specimens (each holding its images' answers, 'rows', and
    its folder, 'path'), their metrics, how to read the answers and the model card. An answer's class
    probabilities are its 'probabilities' object, its refusal score its 'ood' (see results.answers)."""
    if result.specimens is None:
        return json.dumps([r.to_json() for r in result.rows], indent=2) + "\n"
    card = None if result.card is None else to_dict(result.card)
    specimens = [s.to_json() for s in result.specimens]
    obj = {"specimens": specimens, "metrics": result.metrics, "note": result.note, "model": card}
    return json.dumps(obj, indent=2) + "\n"


def as_csv(result: Predictions) -> str:
    """One line per specimen (its path: the folder of its images) and per image, a column per class
    ('p_' and its name, as in oof.csv: a class may be called like a column), the refusal score (an
    image's 'ood': over stats.refusal.REFUSE is refused as not a micrograph), the grey variance of an image
    with no fungus visible; blank cells where a row has no value."""
    out = io.StringIO()
    writer = csv.writer(out)
    keys = ("path", "label", "class", "decision", "confidence", "probability", "set", "set_size", "answer")
    classes = result.classes
    writer.writerow(
        ["level", "specimen", *keys, *(f"p_{c}" for c in classes), "refusal_score", "grey_variance", "status"]
    )
    for level, specimen, r in _levels(result):
        shown = r.to_json()
        probs = r.probabilities or {}
        cells = [*(shown.get(k) for k in keys), *(probs.get(c) for c in classes), shown.get("ood")]
        cells.append(shown.get("grey_variance"))
        writer.writerow([level, specimen, *("" if c is None else c for c in cells), _status(r)])
    return out.getvalue()


CONFIDENCE, PROBABILITY = "calibrated confidence", "probability"
LEGEND = (
    f"{PROBABILITY}: the model's probability of the class (a specimen's: its counted images' pooled by the "
    "run's specimen rule, their mean by default); "
    f"{CONFIDENCE}: that probability calibrated by the temperature the run checked (what thresholds use)"
)


def as_table(result: Predictions) -> str:
    """Aligned columns (a specimen's images indented under it, its answer beside it; an image not
    answered: why, with its figure), what the calibrated confidence and the probability are, then how
    to read the answers, the specimens' metrics and the model card."""
    classes, nested = result.classes, result.specimens is not None
    width = max(len(r.path) for r in result.rows) + 2
    sets = max((len(r.set or "") for _, _, r in _levels(result)), default=0)
    conf, prob = len(CONFIDENCE), len(PROBABILITY)
    head = f"{'path':<{width}}  {'decision':>9}  {CONFIDENCE}  {PROBABILITY}  {'set':<{sets}}  "
    lines = [head + "  ".join(f"{c:>6}" for c in classes)]
    for level, _, r in _levels(result):
        name = r.specimen if isinstance(r, SpecimenAnswer) else r.path
        name = f"  {name}" if level == "image" and nested else name
        if r.class_ is not None and r.probabilities is not None:
            probs = "  ".join(f"{r.probabilities[c]:6.3f}" for c in classes)
            cells = f"{r.decision:>9}  {r.confidence:>{conf}.2f}  {r.probability:>{prob}.2f}"
            cells += f"  {r.set or '':<{sets}}  {probs}"
            answer = f"  -> {r.answer}" if isinstance(r, SpecimenAnswer) else ""
            lines.append(f"{name:<{width}}  {cells}{_count(r)}{answer}")
        else:
            lines.append(f"{name:<{width}}  {reason(r)}{_count(r)}")
    lines.append(LEGEND)
    lines += [f"answers: {result.note}"] if result.note else []
    if result.metrics is not None:
        lines.append(metrics_line(f"per specimen ({result.metrics['n']} with a known class)", result.metrics))
    lines += [f"selective answers: {result.selective.summary()}"] if result.selective is not None else []
    lines += [f"model: {result.card.summary()}"] if result.card is not None else []
    return "\n".join(lines) + "\n"


def _levels(result: Predictions) -> list[tuple[str, str, ImageAnswer | SpecimenAnswer]]:
    """(level, specimen, answer): every image, or every specimen followed by its images."""
    if result.specimens is None:
        return [("image", "", r) for r in result.rows]
    return [
        (lvl, s.specimen, r) for s in result.specimens for lvl, r in [("specimen", s), *(("image", r) for r in s.rows)]
    ]


def _status(row: ImageAnswer | SpecimenAnswer) -> str:
    """Why an answer has no class: an image's error, or its status ('no fungus visible'), or a specimen's."""
    return (row.error if isinstance(row, ImageAnswer) else None) or row.status or ""


def _count(row: ImageAnswer | SpecimenAnswer) -> str:
    """For a specimen: how many of its images decided it."""
    if not isinstance(row, SpecimenAnswer):
        return ""
    fungus = f", {row.no_fungus} with no fungus visible" if row.no_fungus else ""
    uncertain = row.classified - row.counted
    left_out = f", {uncertain} uncertain left out" if uncertain else ""
    return f"  ({row.counted} of {row.images} images{fungus}{left_out})"
