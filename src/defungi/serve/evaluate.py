"""A trained run answering a labelled folder as a lab would use it: every image and every specimen
answered as `predict` answers them, then checked against the true classes: scores with intervals,
the prediction sets' empirical coverage and size, the selective answers' accuracy, the share refused
as not fungus micrographs; the per-image
and per-specimen tables, confusion matrices and confidently wrong images beside them."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from defungi.data.dataset import load_dataset
from defungi.experiments.rundir import RunDir
from defungi.experiments.trust import set_check
from defungi.layout import EvaluationLayout, RunLayout
from defungi.results.ood import OodCheck
from defungi.results.run import Evaluation, PartScores, SelectiveCheck, read_evaluation
from defungi.results.schema import SchemaError, from_dict, to_dict
from defungi.serve.predict import NOT_SURE, Answers, by_specimen, check_group_by, classify
from defungi.serve.predictor import Predictor, torch_predictor
from defungi.train.metrics import scored
from defungi.train.ood import refused_share
from defungi.utils import atomic_write_json, atomic_write_text


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
    RunDir(out.root).prepare()
    model = torch_predictor(run_dir)
    answers = Answers.of(model, **(settings or {}))
    data = load_dataset(data_root, model.image_size, model.variance_threshold, classes=model.classes)
    rows = [{"path": str(p), "label": model.classes[y]} for p, y in zip(data.paths, data.labels, strict=True)]
    rows = classify(model, rows, {r["path"]: data.images[i] for i, r in enumerate(rows)}, tta, prior_weight, answers)
    specimens = by_specimen(rows, model, answers, group_by)
    evaluation = Evaluation(
        scores=_scores(model, rows, specimens, tta),
        data=str(Path(data_root).resolve()),
        run=str(run_dir),
        model=model.card.model if model.card else str(run_dir),
        tta=model.tta if tta is None else tta,
        prior_weight=model.prior_weight if prior_weight is None else prior_weight,
        excluded=data.excluded,
        group_by=group_by,
        level=answers.coverage if answers.trust else None,
        sets=_set_checks(model.classes, rows, specimens) if answers.trust else {},
        selective=_selective(answers, specimens, settings or {}),
        ood=_refusals(model, specimens),
    )
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


def _specimen_rows(specimens: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(specimen, image row) for every classified image, specimen by specimen."""
    return [(s, r) for s in specimens for r in s["rows"] if "class" in r]


def _scores(
    model: Predictor, rows: list[dict[str, Any]], specimens: list[dict[str, Any]], tta: bool | None
) -> PartScores:
    """Per image and per specimen (its images' probabilities pooled by the run's rule), with intervals
    over specimens."""
    pairs = _specimen_rows(specimens)
    probs = np.array([[r[c] for c in model.classes] for _, r in pairs])
    labels = np.array([model.classes.index(r["label"]) for _, r in pairs])
    groups = np.array([s["specimen"] for s, _ in pairs])
    result = scored(probs, labels, groups, model.classes, rule=model.specimen_rule)
    return from_dict(PartScores, result | {"tta": model.tta if tta is None else tta}, "evaluation")


def _set_checks(classes: list[str], rows: list[dict[str, Any]], specimens: list[dict[str, Any]]) -> dict[str, Any]:
    """The sets' empirical coverage and size per image and per specimen, intervals over specimens."""
    pairs = _specimen_rows(specimens)
    decided = [s for s in specimens if "set_classes" in s and s.get("label")]
    checks = {}
    for unit, items, groups in (
        ("image", [r for _, r in pairs], [s["specimen"] for s, _ in pairs]),
        ("specimen", decided, [s["specimen"] for s in decided]),
    ):
        if not items:
            continue
        sets = np.array([[c in r["set_classes"] for c in classes] for r in items])
        labels = np.array([classes.index(r["label"]) for r in items])
        checks[unit] = set_check(sets, labels, np.array(groups), classes)
    return checks


def _selective(answers: Answers, specimens: list[dict[str, Any]], settings: dict[str, Any]) -> SelectiveCheck | None:
    """How the specimens answered at the target accuracy's threshold fared (None without a target)."""
    if answers.selective is None:
        return None
    known = [s for s in specimens if s.get("label") and "class" in s]
    answered = np.array([s["answer"] != NOT_SURE for s in known])
    right = np.array([s["class"] == s["label"] for s in known])
    draws = np.random.default_rng(0).integers(0, len(known), (1000, len(known)))
    accuracy = [right[d][answered[d]].mean() for d in draws if answered[d].any()]
    return SelectiveCheck(
        target_accuracy=settings["target_accuracy"],
        threshold=answers.selective[0],
        answered=float(answered.mean()),
        accuracy=float(right[answered].mean()) if answered.any() else float("nan"),
        interval=[float(np.percentile(accuracy, 2.5)), float(np.percentile(accuracy, 97.5))] if accuracy else [],
    )


def _refusals(model: Predictor, specimens: list[dict[str, Any]]) -> OodCheck | None:
    """The share of the folder's usable images refused as not fungus micrographs, with a 95% interval
    over specimens (None where the run has no detector)."""
    detectors = model.trained.detectors if model.trained is not None else None
    pairs = [(s["specimen"], r["ood"]) for s in specimens for r in s["rows"] if "ood" in r]
    if detectors is None or not pairs:
        return None
    groups, scores = np.array([g for g, _ in pairs]), np.array([x for _, x in pairs])
    share, interval = refused_share(scores > 1, groups)
    return OodCheck("evaluation", detectors[0].quantile, [d.threshold for d in detectors], len(pairs), share, interval)


def _write_tables(out: EvaluationLayout, classes: list[str], specimens: list[dict[str, Any]]) -> None:
    """predictions.csv (a row per classified image) and specimens.csv (a row per specimen): 'confidence'
    calibrated, 'probability' the model's (a specimen's: pooled) of the predicted class."""
    images = [
        [r["path"], s["specimen"], r["label"], r.get("class", ""), r.get("decision", r.get("status", "")),
         f"{r['confidence']:.6f}" if "class" in r else "", f"{r['probability']:.6f}" if "class" in r else "",
         r.get("set", ""),
         f"{r['ood']:.4f}" if "ood" in r else ""] + [f"{r[c]:.6f}" if "class" in r else "" for c in classes]
        for s in specimens
        for r in s["rows"]
        if "class" in r or "ood" in r
    ]  # fmt: skip
    head = ["path", "sample", "class", "prediction", "decision", "confidence", "probability", "set", "ood"]
    head += [f"p_{c}" for c in classes]
    atomic_write_text(out.predictions, _csv(head, images))
    rows = [
        [s["specimen"], s.get("label") or "", s.get("class", ""), s.get("answer", s.get("status", "")),
         f"{s['confidence']:.6f}" if "confidence" in s else "", f"{s['probability']:.6f}" if "confidence" in s else "",
         s.get("set", ""), s["counted"], s["images"],
         "" if not s.get("label") or "class" not in s else ("right" if s["class"] == s["label"] else "wrong"),
         "" if not s.get("label") or "set_classes" not in s else ("yes" if s["label"] in s["set_classes"] else "no")]
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


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
