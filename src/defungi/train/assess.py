"""How far a run's answers can be trusted, measured on predictions it did not fit on.

Given held-out probabilities (out of fold for a cross-validation; validation and test parts for one
split), `assess` fits what answers use (an image and a specimen temperature, conformal thresholds
per level and unit) and checks each on units it was not fitted on: for a cross-validation, fold k is
checked with what the other folds' predictions fitted (cross-fitting), and the stored values are
fitted on every fold; for one split, the validation part fits and the test part checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from defungi.results.trust import (
    ClassCoverage,
    ConformalSets,
    PromiseCheck,
    RiskCoverage,
    SelectivePromise,
    SelectiveRow,
    SetCheck,
    TemperatureCheck,
    Trust,
)
from defungi.stats.conformal import prediction_sets, thresholds, unit_weights
from defungi.stats.metrics import calibration, fit_temperature, mean_nll, specimen_decisions, temper
from defungi.stats.selective import (
    COVERAGES,
    DELTA,
    TARGETS,
    accuracy_at,
    accuracy_intervals,
    guaranteed,
    risk_coverage,
    share_interval,
    threshold_at,
)

LEVELS = (0.9, 0.95)


@dataclass
class Held:
    """Held-out predictions at one unit (images, or specimens by their images pooled: see by_specimen)."""

    probs: np.ndarray
    labels: np.ndarray
    specimens: np.ndarray  # the specimen of each row (itself, for specimens)
    fold: np.ndarray  # which check a row belongs to (-1: only fits)

    def take(self, rows: np.ndarray) -> Held:
        return Held(self.probs[rows], self.labels[rows], self.specimens[rows], self.fold[rows])

    def pairs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(rows that fit, rows that check) per check: every other fold against one fold, or the
        rows of no fold (-1) against the rest."""
        folds = [k for k in np.unique(self.fold) if k >= 0]
        if (self.fold < 0).any():
            return [(np.flatnonzero(self.fold < 0), np.flatnonzero(self.fold >= 0))]
        return [(np.flatnonzero(self.fold != k), np.flatnonzero(self.fold == k)) for k in folds]

    @property
    def fitting(self) -> np.ndarray:
        """The rows the stored values are fitted on."""
        return np.flatnonzero(self.fold < 0) if (self.fold < 0).any() else np.arange(len(self.labels))


def by_specimen(images: Held, rule: str = "mean") -> Held:
    """One row per specimen: its images' probabilities pooled by rule (see stats.metrics.SPECIMEN_RULES),
    its images' class and fold."""
    ids, labels, means = specimen_decisions(images.probs, images.labels, images.specimens, rule)
    _, first = np.unique(images.specimens, return_index=True)
    return Held(means, labels, ids, images.fold[first])


def check_temperature(held: Held, unit: str, fitted_on: str, checked_on: str) -> TemperatureCheck:
    """Fit the temperature on each pair's fitting rows, apply it to its checking rows, and compare
    NLL and ECE there before and after; the stored temperature is fitted on all fitting rows."""
    before, after, labels = [], [], []
    for fit_rows, check_rows in held.pairs():
        t = fit_temperature(held.probs[fit_rows], held.labels[fit_rows])
        before.append(held.probs[check_rows])
        after.append(temper(held.probs[check_rows], t))
        labels.append(held.labels[check_rows])
    b, a, y = np.concatenate(before), np.concatenate(after), np.concatenate(labels)
    nll_b, nll_a = mean_nll(b, y), mean_nll(a, y)
    ece_b, ece_a = calibration(b, y)["ece"], calibration(a, y)["ece"]
    rows = held.fitting
    return TemperatureCheck(
        unit=unit,  # type: ignore[arg-type]
        temperature=fit_temperature(held.probs[rows], held.labels[rows]),
        fitted_on=fitted_on,
        checked_on=checked_on,
        nll_before=nll_b,
        nll_after=nll_a,
        ece_before=ece_b,
        ece_after=ece_a,
        kept=bool(nll_a < nll_b and ece_a < ece_b),
    )


def set_check(
    sets: np.ndarray, labels: np.ndarray, specimens: np.ndarray, classes: Sequence[str], seed: int = 0
) -> SetCheck:
    """Coverage and size of sets (boolean, rows x classes) against labels, with intervals from a
    bootstrap that draws specimens, each with all its rows."""
    hit, size = sets[np.arange(len(labels)), labels].astype(float), sets.sum(1).astype(float)
    counts, inverse = _specimen_draws(specimens, np.random.default_rng(seed))
    cov, mean_size = _resampled_means(counts, hit, inverse), _resampled_means(counts, size, inverse)
    return SetCheck(
        coverage=float(hit.mean()),
        coverage_interval=[float(np.percentile(cov, 2.5)), float(np.percentile(cov, 97.5))],
        mean_size=float(size.mean()),
        size_interval=[float(np.percentile(mean_size, 2.5)), float(np.percentile(mean_size, 97.5))],
        singleton_share=float(np.mean(size == 1)),
        n=len(labels),
        per_class={
            c: ClassCoverage(float(hit[labels == k].mean()), float(size[labels == k].mean()), int(np.sum(labels == k)))
            for k, c in enumerate(classes)
            if np.any(labels == k)
        },
    )


def conformal_sets(held: Held, unit: str, level: float, classes: Sequence[str], seed: int = 0) -> ConformalSets:
    """Thresholds at level, fitted on the fitting rows, and both modes checked by cross-fitting;
    class-conditional answers where some class's marginal coverage fell short of the level by more
    than its interval allows (its upper end below the level)."""
    n_classes = len(classes)
    weights = unit_weights(held.specimens)
    checked_sets: dict[str, list[np.ndarray]] = {"marginal": [], "class-conditional": []}
    check_rows = []
    for fit_rows, rows in held.pairs():
        marginal, per_class = thresholds(
            held.probs[fit_rows], held.labels[fit_rows], n_classes, level, weights[fit_rows]
        )
        checked_sets["marginal"].append(prediction_sets(held.probs[rows], marginal))
        checked_sets["class-conditional"].append(prediction_sets(held.probs[rows], per_class))
        check_rows.append(rows)
    rows = np.concatenate(check_rows)
    checked = {
        mode: set_check(np.concatenate(s), held.labels[rows], held.specimens[rows], classes, seed)
        for mode, s in checked_sets.items()
    }
    short = _class_falls_short(np.concatenate(checked_sets["marginal"]), held.take(rows), level, seed)
    fit = held.fitting
    marginal, per_class = thresholds(held.probs[fit], held.labels[fit], n_classes, level, weights[fit])
    return ConformalSets(
        level=level,
        unit=unit,  # type: ignore[arg-type]
        marginal=marginal,
        per_class={c: float(t) for c, t in zip(classes, per_class, strict=True)},
        mode="class-conditional" if short else "marginal",
        calibration_units=len(np.unique(held.specimens[fit])),
        checked=checked,
    )


def _class_falls_short(sets: np.ndarray, held: Held, level: float, seed: int) -> bool:
    """Whether some class's coverage is below level beyond the noise (the upper end of its 95%
    bootstrap interval over specimens under the level)."""
    hit = sets[np.arange(len(held.labels)), held.labels].astype(float)
    rng = np.random.default_rng(seed)
    for c in np.unique(held.labels):
        rows = held.labels == c
        counts, inverse = _specimen_draws(held.specimens[rows], rng)
        if np.percentile(_resampled_means(counts, hit[rows], inverse), 97.5) < level:
            return True
    return False


def _specimen_draws(
    specimens: np.ndarray, rng: np.random.Generator, draws: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """A bootstrap over specimens: how often each specimen is drawn in each of draws resamples (draws x
    specimens), and each row's specimen (an index into them)."""
    ids, inverse = np.unique(specimens, return_inverse=True)
    drawn = rng.integers(0, len(ids), (draws, len(ids)))
    return np.stack([np.bincount(d, minlength=len(ids)) for d in drawn]), inverse


def _resampled_means(counts: np.ndarray, values: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """The mean of the rows' values in each resample of _specimen_draws (each specimen's rows counted as
    often as it is drawn), summed per specimen first: a tenth of the time of a weight per row."""
    sums = np.bincount(inverse, weights=values, minlength=counts.shape[1])
    return (counts @ sums) / (counts @ np.bincount(inverse, minlength=counts.shape[1]))


def selective(held: Held, seed: int = 0) -> RiskCoverage:
    """The risk-coverage curve of specimens ranked by their (calibrated) confidence, the accuracy at 100,
    90, 80, 70 and 50% answered with intervals over specimens, and the selective promise at each of
    TARGETS, chosen on every specimen and checked by cross-fitting (see `promise_checks`)."""
    confidence, correct = held.probs.max(1), held.probs.argmax(1) == held.labels
    cut, coverage, accuracy = risk_coverage(confidence, correct)
    intervals = accuracy_intervals(confidence, correct, COVERAGES, seed=seed)
    order = np.sort(confidence)[::-1]
    table = [
        SelectiveRow(c, accuracy_at(confidence, correct, c), iv, float(order[max(1, int(round(c * len(order)))) - 1]))
        for c, iv in zip(COVERAGES, intervals, strict=True)
    ]
    curve = RiskCoverage("specimen", cut.tolist(), coverage.tolist(), accuracy.tolist(), table, len(confidence))
    for target in TARGETS:
        promise = selective_promise(curve, target)
        if promise is not None:
            promise.checked = promise_checks(held, target)
            curve.promises.append(promise)
    return curve


def selective_promise(curve: RiskCoverage, target: float, delta: float = DELTA) -> SelectivePromise | None:
    """The promise Learn-then-Test makes at target on the curve's units (None: no threshold is shown to
    reach it); a stored promise's cross-fitted checks are kept."""
    for promise in curve.promises:
        if abs(promise.target - target) < 1e-9 and abs(promise.delta - delta) < 1e-9:
            return promise
    units = curve.units
    answered = np.rint(np.array(curve.coverage) * units).astype(int)
    errors = np.rint(answered * (1 - np.array(curve.accuracy))).astype(int)
    chosen = guaranteed(np.array(curve.thresholds), answered, errors, target, delta)
    if chosen is None:
        return None
    threshold, i = chosen
    return SelectivePromise(
        target=target,
        delta=delta,
        threshold=threshold,
        share=curve.coverage[i],
        share_interval=share_interval(int(answered[i]), units),
        accuracy=curve.accuracy[i],
        units=units,
    )


def promise_checks(held: Held, target: float, delta: float = DELTA) -> list[PromiseCheck]:
    """The promise at target cross-fitted: for each check, the threshold chosen on the fitting rows'
    specimens and what it delivers on the checking rows' (the share answered and their accuracy)."""
    confidence, correct = held.probs.max(1), held.probs.argmax(1) == held.labels
    checks = []
    for fit_rows, rows in held.pairs():
        threshold = threshold_at(confidence[fit_rows], correct[fit_rows], target, delta)
        answered = confidence[rows] >= threshold if threshold is not None else np.zeros(len(rows), bool)
        fold = int(held.fold[rows[0]]) + 1 if held.fold[rows[0]] >= 0 and (held.fold >= 0).all() else 0
        accuracy = float(correct[rows][answered].mean()) if answered.any() else None
        checks.append(PromiseCheck(fold, threshold, len(rows), int(answered.sum()), accuracy))
    return checks


def assess(
    probs: np.ndarray,
    labels: np.ndarray,
    specimens: np.ndarray,
    fold: np.ndarray,
    classes: Sequence[str],
    source: str,
    levels: Sequence[float] = LEVELS,
    seed: int = 0,
    rule: str = "mean",
) -> Trust:
    """Temperatures, conformal sets (per level, per image and per specimen) and selective answers of
    held-out predictions; fold: the check each row belongs to (-1: only fits, see `Held.pairs`); rule:
    how a specimen's images' probabilities are pooled."""
    images = Held(probs, labels, specimens, fold)
    fitted_on, checked_on = (
        ("the validation part", "the test part") if (fold < 0).any() else ("the other folds", "each fold")
    )
    image_t = check_temperature(images, "image", fitted_on, checked_on)
    images = Held(temper(probs, image_t.applied), labels, specimens, fold)
    pooled = by_specimen(Held(probs, labels, specimens, fold), rule)
    specimen_t = check_temperature(pooled, "specimen", fitted_on, checked_on)
    pooled = Held(temper(pooled.probs, specimen_t.applied), pooled.labels, pooled.specimens, pooled.fold)
    sets = [
        conformal_sets(held, unit, level, classes, seed)
        for level in levels
        for unit, held in (("specimen", pooled), ("image", images))
    ]
    return Trust(
        source=source,
        temperatures={"image": image_t, "specimen": specimen_t},
        sets=sets,
        selective=selective(pooled, seed),
    )
