"""A trained run answering a labelled folder as a lab would use it: every image and every specimen
answered as `predict` answers them, then checked against the true classes: scores with intervals,
the prediction sets' empirical coverage and size, the selective answers' accuracy, the share refused
as not fungus micrographs, the calibration of the confidence; every figure beside what the model card
and the run's held-out checks promised (the card check, a warning where the folder falls outside);
the per-image and per-specimen tables, confusion matrices and confidently wrong images beside them."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from defungi.data.dataset import load_dataset
from defungi.layout import EvaluationLayout, RunLayout
from defungi.results.answers import ImageAnswer, SpecimenAnswer
from defungi.results.ood import OodCheck
from defungi.results.run import (
    CalibrationCheck,
    CardRow,
    Evaluation,
    ModelCard,
    PartScores,
    Reliability,
    SelectiveCheck,
    card_row,
    read_evaluation,
    read_run_metrics,
)
from defungi.results.schema import SchemaError, from_dict, to_dict
from defungi.results.trust import ConformalSets, SetCheck, Unit
from defungi.serve.predict import (
    Answers,
    Decoded,
    by_specimen,
    check_group_by,
    classify,
    probability_table,
    selective_check,
)
from defungi.serve.predictor import Predictor, torch_predictor
from defungi.stats.metrics import calibration, mean_nll, score_metrics, temper
from defungi.train.assess import set_check
from defungi.train.ood import ood_check
from defungi.utils import atomic_write_json, atomic_write_text, check_output

log = logging.getLogger(__name__)


def evaluate_folder(
    run_dir: str | Path,
    data_root: str | Path,
    out_dir: str | Path | None = None,
    tta: bool | None = None,
    prior_weight: float | None = None,
    settings: dict[str, Any] | None = None,
    group_by: str = "name",
) -> tuple[Evaluation, Path]:
    """Answer every usable image of a labelled folder and its specimens (group_by: see
    serve.predict.specimen_of), score the answers, and write metrics.json, predictions.csv and
    specimens.csv to out_dir (default: RUN/evaluations/NAME, NAME-<hash> when another folder of that
    name was evaluated there). settings: Answers.of's coverage, abstain and target_accuracy."""
    check_group_by(group_by)
    out = EvaluationLayout(Path(out_dir)) if out_dir else evaluation_layout(Path(run_dir), Path(data_root))
    check_output(out.root, "--out")
    model = torch_predictor(run_dir)
    answers = Answers.of(model, **(settings or {}))
    data = load_dataset(data_root, model.image_size, model.variance_threshold, classes=model.classes)
    rows = [ImageAnswer(str(p), label=model.classes[y]) for p, y in zip(data.paths, data.labels, strict=True)]
    rows = classify(model, rows, Decoded([r.path for r in rows], data.images), tta, prior_weight, answers)
    specimens = by_specimen(rows, model, answers, group_by)
    units = _labelled(model.classes, specimens)
    scores = _scores(model, units["image"], tta)
    levels, refusals = _set_checks(model, answers, units), _refusals(model, specimens)
    selective = selective_check(answers.selective, specimens) if answers.selective else None
    promises = [selective_check(p, specimens) for p in model.trust.selective.promises] if model.trust else []
    evaluation = Evaluation(
        scores=scores,
        data=str(Path(data_root).resolve()),
        run=str(run_dir),
        model=model.card.model if model.card else str(run_dir),
        tta=model.tta if tta is None else tta,
        prior_weight=model.prior_weight if prior_weight is None else prior_weight,
        excluded=data.excluded,
        group_by=group_by,
        variance_threshold=model.variance_threshold,
        level=answers.coverage if answers.trust else None,
        sets={s.unit: c for s, c in levels if abs(s.level - answers.coverage) < 1e-9},
        selective=selective,
        promises=promises,
        ood=refusals,
        card=[
            *_score_rows(model.card, scores),
            *_coverage_rows(levels),
            *_selective_rows([*promises, *([selective] if selective and selective not in promises else [])]),
            *_refusal_rows(run_dir, refusals),
        ],
        calibration={unit: _calibration(model, unit, labelled) for unit, labelled in units.items()},
    )
    outside = [row.line() for row in evaluation.card if row.verdict == "outside"]
    if outside:
        log.warning("this folder falls outside the model card: %s", "; ".join(outside))
    _write_tables(out, model.classes, specimens)
    atomic_write_json(out.metrics, to_dict(evaluation))
    return evaluation, out.root


def evaluation_layout(run_dir: Path, data_root: Path) -> EvaluationLayout:
    """RUN/evaluations/NAME for a data folder called NAME, unless another folder of that name (or an
    unreadable evaluation) is there: then NAME-<hash of its path>."""
    name = data_root.resolve().name
    out = RunLayout(run_dir).evaluation(name)
    if out.metrics.exists():
        try:
            same = Path(read_evaluation(out.metrics).data).resolve() == data_root.resolve()
        except SchemaError:
            same = False
        if not same:
            digest = hashlib.sha1(str(data_root.resolve()).encode()).hexdigest()[:6]
            out = RunLayout(run_dir).evaluation(f"{name}-{digest}")
    return out


class Labelled(NamedTuple):
    """One unit's answers whose true class is known: the model's probabilities (a specimen's: its images'
    pooled), the true classes and the specimens they belong to."""

    probs: np.ndarray
    labels: np.ndarray
    specimens: np.ndarray


def _labelled(classes: list[str], specimens: list[SpecimenAnswer]) -> dict[Unit, Labelled]:
    """Per image: every classified image; per specimen: every decided specimen whose class is known."""
    images = [(s.specimen, r) for s in specimens for r in s.rows if r.class_ is not None]
    decided = [(s.specimen, s) for s in specimens if s.class_ is not None and s.label]
    return {
        unit: Labelled(
            probability_table([r for _, r in items], classes),
            np.array([classes.index(r.label) for _, r in items]),
            np.array([name for name, _ in items]),
        )
        for unit, items in (("image", images), ("specimen", decided))
        if items
    }


def _scores(model: Predictor, images: Labelled, tta: bool | None) -> PartScores:
    """Per image and per specimen (its images' probabilities pooled by the run's rule), with intervals
    over specimens."""
    result = score_metrics(images.probs, images.labels, images.specimens, model.classes, rule=model.specimen_rule)
    return from_dict(PartScores, result | {"tta": model.tta if tta is None else tta}, "evaluation")


def _set_checks(
    model: Predictor, answers: Answers, units: dict[Unit, Labelled]
) -> list[tuple[ConformalSets, SetCheck]]:
    """At every level and unit the run calibrated sets for: the sets' empirical coverage and size, with
    intervals over specimens (the sets made as answers make them, from the one pass's probabilities)."""
    if answers.trust is None:
        return []
    checks = []
    for s in sorted(answers.trust.sets, key=lambda s: (s.level, s.unit)):
        if s.unit in units:
            probs, labels, specimens = units[s.unit]
            calibrated = temper(probs, model.temperature(s.unit))
            sets = replace(answers, coverage=s.level).sets(s.unit, calibrated, model.classes)
            checks.append((s, set_check(sets, labels, specimens, model.classes)))
    return checks


def _calibration(model: Predictor, unit: Unit, labelled: Labelled) -> CalibrationCheck:
    """The unit's raw and calibrated (the run's temperature) confidence against how often it was right."""
    probs, labels, _ = labelled
    temperature = model.temperature(unit)
    calibrated = temper(probs, temperature)
    return CalibrationCheck(
        temperature=temperature,
        n=len(labels),
        nll_raw=mean_nll(probs, labels),
        nll_calibrated=mean_nll(calibrated, labels),
        raw=from_dict(Reliability, calibration(probs, labels)),
        calibrated=from_dict(Reliability, calibration(calibrated, labels)),
    )


def _score_rows(card: ModelCard | None, scores: PartScores) -> list[CardRow]:
    """Accuracy and macro-F1 per image and per specimen beside the model card's (either way)."""
    if card is None:
        return []
    rows = []
    for unit, measured in (("image", scores), ("specimen", scores.samples)):
        for metric, name in (("accuracy", "accuracy"), ("f1", "macro-F1")):
            if measured is not None:
                key, value, interval = f"{unit}_{metric}", getattr(measured, metric), measured.interval(metric)
                promise = getattr(card, key), card.intervals.get(key, [])
                rows.append(card_row(f"{unit} {name}", "two-sided", *promise, value, interval or []))
    return rows


def _coverage_rows(levels: list[tuple[ConformalSets, SetCheck]]) -> list[CardRow]:
    """Every calibrated level's sets per unit: coverage at least the level (the run's held-out check of the
    mode that answers beside it)."""
    rows = []
    for s, check in levels:
        held = s.checked.get(s.mode)
        promised, interval = (held.coverage, held.coverage_interval) if held else (s.level, [])
        figure = f"sets at {s.level:.0%}, per {s.unit}: coverage"
        rows.append(card_row(figure, "at least", promised, interval, check.coverage, check.coverage_interval, s.level))
    return rows


def _selective_rows(checks: list[SelectiveCheck]) -> list[CardRow]:
    """Per selective promise: the accuracy on the specimens answered (at least the target: a guarantee,
    so outside only when the folder's interval lies below it) and the share answered (either way)."""
    rows = []
    for c in checks:
        if c.n_answered:
            figure = f"specimens answered at {c.target_accuracy:.0%} target: accuracy"
            held_out = c.accuracy_held_out
            rows.append(card_row(figure, "at least", held_out, [], c.accuracy, c.interval, c.target_accuracy))
        if c.n and c.share_promised:
            figure = f"specimens answered at {c.target_accuracy:.0%} target: share"
            rows.append(card_row(figure, "two-sided", c.share_expected, c.share_promised, c.answered, c.share_interval))
    return rows


def _refusal_rows(run_dir: str | Path, refusals: OodCheck | None) -> list[CardRow]:
    """The shares refused as not fungus micrographs and flagged unlike the training specimens, beside
    those of the run's held-out micrographs (more is worse), where both were measured at one threshold."""
    path = RunLayout(Path(run_dir)).metrics
    held_out = read_run_metrics(path).ood if path.exists() else None
    if held_out is None or refusals is None or held_out.refuse_over != refusals.refuse_over:
        return []
    rows = [
        card_row(
            "refused as not a fungus micrograph", "at most", held_out.refused, held_out.interval,
            refusals.refused, refusals.interval,
        )
    ]  # fmt: skip
    if held_out.flagged_interval and refusals.flagged_interval:
        figure = "flagged unlike the training specimens"
        rows.append(
            card_row(figure, "at most", held_out.flagged, held_out.flagged_interval, refusals.flagged,
                     refusals.flagged_interval)
        )  # fmt: skip
    return rows


def _refusals(model: Predictor, specimens: list[SpecimenAnswer]) -> OodCheck | None:
    """The folder's usable images refused as not fungus micrographs and flagged unlike the training
    specimens, with 95% intervals over specimens (None where the run has no detector)."""
    detectors = model.trained.detectors if model.trained is not None else None
    pairs = [(s.specimen, r.ood) for s in specimens for r in s.rows if r.ood is not None]
    if detectors is None or not pairs:
        return None
    names, scores = np.array([name for name, _ in pairs]), np.array([x for _, x in pairs])
    return ood_check("evaluation", detectors[0].quantile, [d.threshold for d in detectors], scores, names)


def _write_tables(out: EvaluationLayout, classes: list[str], specimens: list[SpecimenAnswer]) -> None:
    """predictions.csv (a row per classified image) and specimens.csv (a row per specimen): 'confidence'
    calibrated, 'probability' the model's (a specimen's: pooled) of the predicted class."""
    images = [
        [r.path, s.specimen, r.label, r.class_ or "", r.decision or r.status or "",
         *(_figure(x, 6) for x in (r.confidence, r.probability)), r.set or "", _figure(r.ood, 4),
         *(_figure(r.probabilities and r.probabilities[c], 6) for c in classes)]
        for s in specimens
        for r in s.rows
        if r.class_ is not None or r.ood is not None
    ]  # fmt: skip
    head = ["path", "sample", "class", "prediction", "decision", "confidence", "probability", "set", "ood"]
    head += [f"p_{c}" for c in classes]
    atomic_write_text(out.predictions, _csv(head, images))
    rows = [
        [s.specimen, s.label or "", s.class_ or "", s.answer or s.status or "",
         *(_figure(x, 6) for x in (s.confidence, s.probability)), s.set or "", s.counted, s.images,
         "" if not s.label or s.class_ is None else ("right" if s.class_ == s.label else "wrong"),
         "" if not s.label or s.set_classes is None else ("yes" if s.label in s.set_classes else "no")]
        for s in specimens
    ]  # fmt: skip
    head = [
        "specimen",
        "class",
        "prediction",
        "answer",
        "confidence",
        "probability",
        "set",
        "images_decided",
        "images",
        "right",
        "in_set",
    ]
    atomic_write_text(out.specimens, _csv(head, rows))


def _figure(value: float | None, digits: int) -> str:
    """A figure of the tables with digits decimals, blank where there is none."""
    return "" if value is None else f"{value:.{digits}f}"


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
