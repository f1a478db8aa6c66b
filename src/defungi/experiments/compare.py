"""Two finished runs compared on the images both scored: the difference of their macro metrics, per
image and per specimen, with a 95% interval from a paired bootstrap over specimens."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defungi.errors import DefungiError
from defungi.layout import RunLayout, read_table
from defungi.results.run import PairedDifference, read_run_metrics
from defungi.results.schema import from_dict
from defungi.stats.metrics import bootstrap_difference, specimen_decisions
from defungi.train.checkpoint import read_config

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """A run's scored images (out-of-fold for a cross-validation, else its test part), sorted by path."""

    paths: list[str]
    labels: np.ndarray
    specimens: np.ndarray
    probs: np.ndarray
    classes: list[str]
    rule: str = "mean"  # how the run pools a specimen's images (train.specimen_rule)


def scored_images(run_dir: Path) -> Scored:
    """Read a finished run's scored images from oof.csv or predictions_test.csv."""
    layout = RunLayout(Path(run_dir))
    if not layout.metrics.exists():
        raise DefungiError(f"{run_dir}: not a finished run folder (no metrics.json); train it first")
    classes = read_run_metrics(layout.metrics).classes
    path = layout.oof if layout.oof.exists() else layout.predictions("test")
    if not path.exists():
        raise DefungiError(f"{run_dir}: no {path.name}; it scored no test images, so there is nothing to compare")
    rows = sorted(read_table(path), key=lambda r: r["path"])
    return Scored(
        paths=[r["path"] for r in rows],
        labels=np.array([classes.index(r["class"]) for r in rows]),
        specimens=np.array([r["sample"] for r in rows]),  # the CSV column keeps its name
        probs=np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows]),
        classes=classes,
        rule=read_config(layout.config).train.specimen_rule,
    )


def _only(scored: Scored, paths: list[str]) -> Scored:
    """The scored images among paths (sorted), in their order."""
    keep = np.isin(np.array(scored.paths), paths)
    return Scored(
        paths=[p for p, k in zip(scored.paths, keep, strict=True) if k],
        labels=scored.labels[keep],
        specimens=scored.specimens[keep],
        probs=scored.probs[keep],
        classes=scored.classes,
        rule=scored.rule,
    )


def paired_difference(first: Path, second: Path, seed: int = 0) -> PairedDifference:
    """Second run minus first, on the images both scored (all of one run's: e.g. a cross-validation that
    fitted some of its folds against one that fitted all): per metric the difference and its 95% interval,
    image-level and specimen-level (a specimen's decision: its images' probabilities pooled by each run's
    specimen rule)."""
    a, b = scored_images(first), scored_images(second)
    common = sorted(set(a.paths) & set(b.paths))
    if len(common) < min(len(a.paths), len(b.paths)) or not common or a.classes != b.classes:
        raise DefungiError(
            f"{first} and {second} scored different images or classes; compare runs on the same data "
            "(e.g. one recipe under grouped and random cross-validation; one run may score a part of the other's)"
        )
    if len(common) < max(len(a.paths), len(b.paths)):
        log.info("%s and %s compared on the %d images both scored", first, second, len(common))
    a, b = _only(a, common), _only(b, common)
    n_classes = len(a.classes)
    images = bootstrap_difference(a.labels, a.probs.argmax(1), b.probs.argmax(1), a.specimens, n_classes, seed=seed)
    ids, labels, first_probs = specimen_decisions(a.probs, a.labels, a.specimens, a.rule)
    second_probs = specimen_decisions(b.probs, b.labels, b.specimens, b.rule)[2]
    specimens = bootstrap_difference(labels, first_probs.argmax(1), second_probs.argmax(1), ids, n_classes, seed=seed)
    return from_dict(
        PairedDifference, {"images": images, "samples": specimens, "n_images": len(a.paths), "n_samples": len(ids)}
    )
