"""Class and probabilities for image files or folders, and one decision per specimen."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defungi.data.cache import DECODE_ERRORS, decode_one
from defungi.data.quality import low_variance
from defungi.data.scan import IMAGE_SUFFIXES, parse_name
from defungi.errors import DefungiError
from defungi.layout import RunLayout
from defungi.serve.lite import onnx_predictor
from defungi.serve.predictor import Predictor, torch_predictor
from defungi.train.metrics import classification_metrics, temper

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")


def open_predictor(source: str | Path, backend: str = "torch", device: str = "auto") -> Predictor:
    """The model of a run folder with PyTorch, or with onnxruntime from SOURCE/model.onnx (or a .onnx file)."""
    if backend == "onnx":
        path = Path(source)
        return onnx_predictor(RunLayout(path).onnx if path.is_dir() else path)
    if backend != "torch":
        raise DefungiError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
    return torch_predictor(source, device)


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Image files named directly, and every image file under named folders."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise DefungiError(f"{p}: no such file or folder")
    if not files:
        raise DefungiError(f"no image files (.jpg/.png/.tif/.bmp) in {', '.join(map(str, paths))}")
    return files


def predict(
    model: Predictor,
    paths: list[str | Path],
    tta: bool | None = None,
    prior_weight: float | None = None,
    abstain: float = 0.0,
) -> list[dict[str, Any]]:
    """One row per file. A row holds the path, the class the folder or the file name gives
    ('label', when it is a class of the model), and the predicted class with its probability per
    class; or 'no fungus visible' for an image under the run's variance threshold (blank or
    blurred: training leaves such images out, so they are not classified), 'not a fungus micrograph'
    for one whose out-of-distribution score ('ood', see train.ood) is over 1, or the error.
    The class probabilities are the model's, as the run scored them; 'confidence' is the most
    probable class's probability calibrated by the run's temperature, and below `abstain` a row's
    decision is 'uncertain' (its most probable class is kept beside it)."""
    files = expand_paths(paths)
    rows, pixels = decode(model, files)
    return classify(model, rows, pixels, tta, prior_weight, abstain)


def decode(model: Predictor, files: list[Path]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """A row per file (its error or 'no fungus visible' where it cannot be classified) and the
    pixels, at the model's input size, of the files to classify (by path)."""
    rows, pixels = [], {}
    for f in files:
        row: dict[str, Any] = {"path": str(f)}
        try:
            image, variance, _ = decode_one(f, model.image_size)
        except DECODE_ERRORS as exc:
            log.warning("skipped %s: %s", f, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            rows.append(row | {"error": f"unreadable image ({type(exc).__name__})"})
            continue
        row["label"] = label_of(f, model.classes)
        if low_variance(np.array([variance]), model.variance_threshold)[0]:
            row["status"] = NO_FUNGUS
        else:
            pixels[str(f)] = image
        rows.append(row)
    return rows, pixels


def classify(
    model: Predictor,
    rows: list[dict[str, Any]],
    pixels: dict[str, np.ndarray],
    tta: bool | None = None,
    prior_weight: float | None = None,
    abstain: float = 0.0,
) -> list[dict[str, Any]]:
    """The rows of decode with the out-of-distribution score ('ood', where the run has a detector) of
    every decoded image, and the class, calibrated confidence, decision and probabilities of those
    that are not refused as 'not a fungus micrograph'."""
    if not pixels:
        return rows
    probs, ood = model.answer(np.stack(list(pixels.values())), tta, prior_weight)
    confidence = temper(probs, model.temperature).max(1)
    result = {}
    for i, (path, p, conf) in enumerate(zip(pixels, probs, confidence, strict=True)):
        if ood is not None and ood[i] > 1:
            result[path] = {"status": NOT_MICROGRAPH, "ood": float(ood[i])}
            continue
        best = model.classes[int(p.argmax())]
        result[path] = {"class": best, "confidence": float(conf), "decision": decide(best, conf, abstain)}
        result[path] |= {c: float(v) for c, v in zip(model.classes, p, strict=True)}
        result[path] |= {"ood": float(ood[i])} if ood is not None else {}
    return [r | result.get(r["path"], {}) for r in rows]


NO_FUNGUS = "no fungus visible"
NOT_MICROGRAPH = "not a fungus micrograph"  # out of distribution: far from every training micrograph
UNCERTAIN = "uncertain"


def decide(best: str, confidence: float, abstain: float) -> str:
    """The class, or 'uncertain' when the calibrated confidence is under the abstention threshold."""
    return best if confidence >= abstain else UNCERTAIN


def label_of(path: Path, classes: list[str]) -> str | None:
    """The true class where the file says it: its folder's name, else its DeFungi name (H1_100a_3)."""
    if path.parent.name in classes:
        return path.parent.name
    parsed = parse_name(path.stem)
    return parsed["cls"].upper() if parsed and parsed["cls"].upper() in classes else None


def specimen_of(path: Path, group_by: str) -> str:
    """The specimen a file belongs to: 'name' (DeFungi names: class and sample number, else the
    folder), 'folder' (one folder per specimen), or a regular expression whose first group (or
    whole match) on the file name is the specimen."""
    if group_by == "name":
        parsed = parse_name(path.stem)
        return f"{parsed['cls'].upper()}_{parsed['sample']}" if parsed else str(path.parent)
    if group_by == "folder":
        return str(path.parent)
    match = re.search(group_by, path.name)
    return (match.group(1) if match.groups() else match.group(0)) if match else path.name


def by_specimen(
    rows: list[dict[str, Any]],
    classes: list[str],
    group_by: str = "name",
    abstain: float = 0.0,
    temperature: float = 1.0,
) -> list[dict[str, Any]]:
    """One decision per specimen: the mean probability of its classified images, then the most
    probable class (the rule the sample-level metrics use); 'no fungus visible' (or 'not a fungus
    micrograph') when none of its images could be classified. Its confidence is the decision's mean
    probability at the run's (image-level) temperature, and 'uncertain' below abstain. Each specimen
    keeps its image rows."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(specimen_of(Path(row["path"]), group_by), []).append(row)
    specimens = []
    for name, members in groups.items():
        classified = [r for r in members if "class" in r]
        labels = {r["label"] for r in members if r.get("label")}
        decision: dict[str, Any] = {"specimen": name, "label": labels.pop() if len(labels) == 1 else None}
        decision |= {"images": len(members), "classified": len(classified)}
        decision["no_fungus"] = sum(r.get("status") == NO_FUNGUS for r in members)
        if classified:
            mean = np.mean([[r[c] for c in classes] for r in classified], axis=0)
            best, conf = classes[int(mean.argmax())], float(temper(mean[None], temperature).max())
            decision |= {"class": best, "confidence": conf, "decision": decide(best, conf, abstain)}
            decision |= {c: float(v) for c, v in zip(classes, mean, strict=True)}
        else:
            refused = any(r.get("status") == NOT_MICROGRAPH for r in members)
            decision["status"] = (
                NO_FUNGUS if decision["no_fungus"] else NOT_MICROGRAPH if refused else "no readable image"
            )
        specimens.append(decision | {"rows": members})
    return specimens


def specimen_metrics(specimens: list[dict[str, Any]], classes: list[str]) -> dict[str, Any] | None:
    """Accuracy and macro P / R / F1 over the decided specimens whose true class is known (None if none)."""
    known = [s for s in specimens if s.get("label") and "class" in s]
    if not known:
        return None
    y_true = np.array([classes.index(s["label"]) for s in known])
    y_pred = np.array([classes.index(s["class"]) for s in known])
    return classification_metrics(y_true, y_pred, classes)


@dataclass
class Predictions:
    """What `defungi predict` answers: the model's classes and a row per image; with specimens, one
    decision per specimen (each holding its image rows) and their metrics where the class is known."""

    classes: list[str]
    rows: list[dict[str, Any]]
    specimens: list[dict[str, Any]] | None = None
    metrics: dict[str, Any] | None = None


def predict_files(
    source: str | Path,
    paths: list[str | Path],
    backend: str = "torch",
    tta: bool | None = None,
    prior_weight: float | None = None,
    abstain: float = 0.0,
    by_sample: bool = False,
    group_by: str = "name",
) -> Predictions:
    """`defungi predict`: the model of source (see open_predictor) on every image file of paths; with
    by_sample, one decision per specimen as well (group_by: see specimen_of, checked before any work)."""
    if group_by not in ("name", "folder"):
        try:
            re.compile(group_by)
        except re.error as exc:
            raise DefungiError(f"--group-by {group_by}: not a regular expression ({exc})") from None
    model = open_predictor(source, backend)
    classes = list(model.classes)
    rows = predict(model, paths, tta, prior_weight, abstain)
    if not by_sample:
        return Predictions(classes, rows)
    specimens = by_specimen(rows, classes, group_by, abstain, model.temperature)
    return Predictions(classes, rows, specimens, specimen_metrics(specimens, classes))
