"""Classification metrics: accuracy, macro precision / recall / F1, per class, confusion matrix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import trim_mean
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from defungi.errors import DefungiError


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Macro-averaged metrics over the classes that have images here (the model's other classes are
    listed as absent), the per-class table and the confusion matrix."""
    labels = list(range(len(classes)))
    present = [int(c) for c in np.unique(y_true)]
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average="macro", zero_division=0)
    confusion = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(mp),
        "recall": float(mr),
        "f1": float(mf),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion.tolist(),
        "most_confused": most_confused(confusion, classes),
        "classes": list(classes),
        "absent_classes": [c for i, c in enumerate(classes) if i not in present],
    }


def most_confused(confusion: np.ndarray, classes: list[str], top: int = 3) -> list[dict[str, Any]]:
    """The largest off-diagonal cells: true class, predicted class, count and share of the true class."""
    off = confusion * (1 - np.eye(len(classes), dtype=confusion.dtype))
    cells = [np.unravel_index(i, off.shape) for i in np.argsort(off, axis=None)[::-1][:top]]
    return [
        {
            "true": classes[t],
            "predicted": classes[q],
            "count": int(off[t, q]),
            "share": float(off[t, q] / confusion[t].sum()),
        }
        for t, q in cells
        if off[t, q] > 0
    ]


def _mean(probs: np.ndarray) -> np.ndarray:
    return probs.mean(0)


def _log_mean(probs: np.ndarray) -> np.ndarray:
    return np.exp(np.log(np.clip(probs, 1e-12, 1)).mean(0))


def _trimmed(probs: np.ndarray) -> np.ndarray:
    return trim_mean(probs, TRIM_SHARE, axis=0)


TRIM_SHARE = 0.2  # the trimmed rule: the share of a specimen's images cut at each end, per class
# a specimen's class probabilities from its images' (images x classes), before renormalising
SPECIMEN_RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": _mean,  # the mean probability
    "log_mean": _log_mean,  # the geometric mean: one image sure that a class is wrong vetoes it
    "trimmed": _trimmed,  # per class, the mean without the lowest and highest TRIM_SHARE of the images
}
SPECIMEN_RULE_TEXT = {
    "mean": "the mean of its images' class probabilities",
    "log_mean": "the geometric mean of its images' class probabilities (the mean log-probability)",
    "trimmed": f"per class, the mean of its images' probabilities without the lowest and highest {TRIM_SHARE:.0%}",
}


def specimen_probabilities(probs: np.ndarray, rule: str = "mean") -> np.ndarray:
    """One specimen's class probabilities from its images' (images x classes) by a rule of
    SPECIMEN_RULES, renormalised to sum to 1; its decision is the most probable class."""
    if rule not in SPECIMEN_RULES:
        raise DefungiError(f"unknown specimen rule '{rule}'; use one of {', '.join(SPECIMEN_RULES)}")
    pooled = SPECIMEN_RULES[rule](np.asarray(probs, dtype=np.float64))
    return pooled / pooled.sum()


def specimen_rule_text(rule: str) -> str:
    """How a specimen's decision is made under rule, in words (metrics.json's sample_rule)."""
    return f"a sample's decision: {SPECIMEN_RULE_TEXT[rule]}, then the most probable class"


def specimen_decisions(
    probs: np.ndarray, labels: np.ndarray, specimens: np.ndarray, rule: str = "mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One decision per specimen: its images' probabilities pooled by rule (see
    specimen_probabilities).

    Returns (specimen ids, their labels: the most common label of their images, their probabilities).
    """
    ids, inverse = np.unique(specimens, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    ends = np.cumsum(np.bincount(inverse, minlength=len(ids)))[:-1]
    pooled = np.stack([specimen_probabilities(p, rule) for p in np.split(probs[order], ends)])
    votes = np.zeros((len(ids), probs.shape[1]), dtype=int)
    np.add.at(votes, (inverse, labels), 1)
    return ids, votes.argmax(1), pooled


def _scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and macro precision / recall / F1 of confusion matrices (..., C, C), over the classes
    with images (a class no image belongs to is left out, as a resample may have none)."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    support, predicted = confusion.sum(-1), confusion.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    n_present = present.sum(-1)
    macro = {
        k: (v * present).sum(-1) / n_present for k, v in (("precision", precision), ("recall", recall), ("f1", f1))
    }
    return {"accuracy": tp.sum(-1) / confusion.sum((-2, -1)), **macro}


def _resample_weights(specimens: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, images) weights of a bootstrap that draws specimens with replacement,
    each drawn specimen bringing all its images."""
    ids, inverse = np.unique(specimens, return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(ids), (n_boot, len(ids)))
    return np.stack([np.bincount(d, minlength=len(ids)) for d in draws])[:, inverse]


def _resampled_scores(
    labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray, n_classes: int
) -> dict[str, np.ndarray]:
    """The scores of every resample (rows of weights)."""
    cells = labels * n_classes + predictions
    confusion = np.stack([np.bincount(cells, weights=w, minlength=n_classes**2) for w in weights])
    return _scores(confusion.reshape(len(weights), n_classes, n_classes))


def _percentiles(values: np.ndarray, level: float) -> list[float]:
    tail = 100 * (1 - level) / 2
    return [float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail))]


def bootstrap_intervals(
    labels: np.ndarray,
    predictions: np.ndarray,
    specimens: np.ndarray,
    n_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """95% intervals of accuracy and macro P / R / F1 from a bootstrap that resamples
    specimens with replacement, each drawn specimen bringing all its images."""
    weights = _resample_weights(specimens, n_boot, seed)
    scores = _resampled_scores(labels, predictions, weights, n_classes)
    return {k: _percentiles(v, level) for k, v in scores.items()}


def bootstrap_difference(
    labels: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    specimens: np.ndarray,
    n_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Second minus first predictions of the same images, per metric: the difference and its 95%
    interval from a paired bootstrap over specimens (both scored on every resample)."""
    weights = _resample_weights(specimens, n_boot, seed)
    a, b = (_resampled_scores(labels, p, weights, n_classes) for p in (first, second))
    full = np.ones((1, len(labels)))
    a0, b0 = (_resampled_scores(labels, p, full, n_classes) for p in (first, second))
    return {k: {"difference": float(b0[k][0] - a0[k][0]), "interval": _percentiles(b[k] - a[k], level)} for k in a}


def calibration(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of the top-class confidence, and the reliability table behind it."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    confidence = np.nan_to_num(confidence, nan=0.0, posinf=1.0, neginf=0.0)  # a diverged model: no crash here
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    mean_conf = np.bincount(bins, weights=confidence, minlength=n_bins) / np.maximum(count, 1)
    accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / np.maximum(count, 1)
    ece = float(np.sum(count / max(len(labels), 1) * np.abs(accuracy - mean_conf)))
    return {
        "ece": ece,
        "bins": n_bins,
        "count": count.tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": accuracy.tolist(),
    }


def mean_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of probabilities against labels (NaN for no images)."""
    return (
        float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1)).mean()) if len(labels) else float("nan")
    )


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with their temperature changed: p ** (1 / T), renormalised (the same ranking;
    T > 1 softens over-confident probabilities)."""
    tempered = np.clip(probs, 1e-12, 1) ** (1.0 / temperature)
    return tempered / tempered.sum(1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature (0.05 to 20) that minimises the cross-entropy of labelled probabilities
    (temperature scaling, Guo et al. 2017)."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        tempered = temper(probs, float(np.exp(log_t)))
        return float(-np.log(np.clip(tempered[np.arange(len(labels)), labels], 1e-12, 1)).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20)), method="bounded").x))


def score_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    specimens: np.ndarray,
    classes: list[str],
    seed: int = 0,
    rule: str = "mean",
) -> dict[str, Any]:
    """Image-level metrics with intervals over specimens, and the same for one decision per specimen
    (its images' probabilities pooled by rule, see specimen_probabilities)."""
    predictions = probs.argmax(1)
    images = classification_metrics(labels, predictions, classes)
    images["intervals"] = bootstrap_intervals(labels, predictions, specimens, len(classes), seed=seed)
    ids, specimen_labels, specimen_probs = specimen_decisions(probs, labels, specimens, rule)
    specimens_scored = classification_metrics(specimen_labels, specimen_probs.argmax(1), classes)
    specimens_scored["intervals"] = bootstrap_intervals(
        specimen_labels, specimen_probs.argmax(1), ids, len(classes), seed=seed
    )
    return images | {"samples": specimens_scored, "calibration": calibration(probs, labels)}


def prior_weights(class_prior: Sequence[float] | None, power: float) -> np.ndarray | None:
    """Weights that move a class-balanced model's probabilities towards the training frequencies.

    A model trained on class-balanced batches predicts as if every class were equally common;
    multiplying by prior**power (post-hoc logit adjustment, Menon et al. 2021) puts back part
    (power 0..1) of the real class frequencies. None when there is nothing to adjust.
    """
    if class_prior is None or power == 0:
        return None
    return np.asarray(class_prior, dtype=np.float64) ** power


def weighted(probs: np.ndarray, class_weights: np.ndarray | None) -> np.ndarray:
    """Probabilities rescaled by class weights (see prior_weights) and renormalised."""
    if class_weights is None:
        return probs
    probs = probs * class_weights
    return probs / probs.sum(1, keepdims=True)
