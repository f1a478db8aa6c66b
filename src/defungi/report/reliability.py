"""Tables of what a run measured about its answers (calibration, prediction sets, selective answers)
and of how an evaluation's answers fared (its card check, its calibration): from typed records, no model."""

from __future__ import annotations

from pathlib import Path

from defungi.report.page import Page, Table
from defungi.results.run import CalibrationCheck, CardRow, SelectiveCheck
from defungi.results.trust import PromiseCheck, SelectivePromise, SetCheck, TemperatureCheck, Trust

CARD_SIDES = {"two-sided": "it differs", "at most": "it is higher", "at least": "it is lower"}  # than promised
CARD_RULE = (
    "Promised: the model card's scores (on specimens the run never saw), and what the run measured on held-out "
    "specimens for its sets and refusals. Outside: the gap between the folder's figure and the promise exceeds "
    "their 95% half-widths combined (sqrt(h1^2 + h2^2)), either way for scores and only upwards for refusals; a "
    "set's coverage is outside when the folder's whole 95% interval lies below its level. Intervals are over "
    "specimens."
)


def temperature_table(temperatures: dict[str, TemperatureCheck]) -> Table:
    """Per unit: the temperature, NLL and ECE before and after where it was checked, and whether kept."""
    rows = [
        [unit, f"{t.temperature:.3f}", f"{t.nll_before:.3f} -> {t.nll_after:.3f}",
         f"{t.ece_before:.3f} -> {t.ece_after:.3f}", f"fitted on {t.fitted_on}, checked on {t.checked_on}",
         "yes" if t.kept else "no (it did not lower both)"]
        for unit, t in temperatures.items()
    ]  # fmt: skip
    return Table(["unit", "temperature", "NLL", "ECE", "where", "kept"], rows)


SETS_EXPLAINED = (
    "A prediction set lists the classes an answer may be: at level L it holds the true class of a share L of "
    "answers, checked on specimens that did not calibrate it (coverage). 'one class': the share of sets that "
    "hold exactly one class, i.e. of answers that name a single class; the others name two or more. Mode: one "
    "threshold for every class (marginal) or one per class (class-conditional); '(answers)' marks the one "
    "answers use."
)


def set_table(rows: list[tuple[float, str, str, SetCheck]]) -> Table:
    """One row per (level, unit, mode, check): coverage and mean set size with 95% intervals over
    specimens, the share of one-class sets, n, and the coverage and size per class."""
    cells = []
    for level, unit, mode, c in rows:
        low, high = c.coverage_interval
        size_low, size_high = c.size_interval
        per_class = ", ".join(f"{k} {v.coverage:.2f} ({v.mean_size:.1f})" for k, v in c.per_class.items())
        cells.append(
            [f"{level:.0%}", unit, mode, f"{c.coverage:.3f} [{low:.3f}, {high:.3f}]",
             f"{c.mean_size:.2f} [{size_low:.2f}, {size_high:.2f}]", f"{c.singleton_share:.0%}", str(c.n), per_class]
        )  # fmt: skip
    head = ["level", "unit", "mode", "coverage [95%]", "mean size [95%]", "one class", "n"]
    return Table([*head, "per class: coverage (size)"], cells)


def set_section(page: Page, rows: list[tuple[float, str, str, SetCheck]]) -> None:
    """The prediction sets' one table on a page, after the line that says how to read it."""
    page.text(SETS_EXPLAINED)
    page.table(set_table(rows))


def trust_section(page: Page, trust: Trust, figure: Path | None = None) -> None:
    """A run's trust measurements on its page: calibration, the sets of every level, unit and mode in one
    table, selective answers."""
    page.heading("How far its answers can be trusted", level=2)
    page.text(
        f"Measured on {trust.source} predictions, each checked on specimens that did not fit it (cross-fitted): "
        "a temperature is kept only where it lowered both the NLL and the expected calibration error there."
    )
    page.table(temperature_table(trust.temperatures))
    page.heading("Prediction sets", level=3)
    sets = [(s.level, s.unit, f"{mode}{' (answers)' if mode == s.mode else ''}", c) for s in trust.sets
            for mode, c in s.checked.items()]  # fmt: skip
    set_section(page, sorted(sets, key=lambda r: (r[0], r[1] != "specimen")))
    rows = [[f"{r.coverage:.0%}", f"{r.accuracy:.3f} [{r.interval[0]:.3f}, {r.interval[1]:.3f}]", f"{r.threshold:.3f}"]
            for r in trust.selective.table]  # fmt: skip
    page.heading("Selective answers", level=3)
    page.table(Table(["specimens answered", "accuracy [95%]", "calibrated confidence at least"], rows))
    if trust.selective.promises:
        page.text(
            "Promises for `--target-accuracy`: the threshold Learn-then-Test chooses on every held-out specimen, "
            "and what the threshold chosen on the other folds delivered on each fold (cross-fitted)."
        )
        page.table(promise_table(trust.selective.promises))
    if figure is not None:
        page.figure(figure)


def _promise_check(c: PromiseCheck) -> str:
    """One cross-fitted check, e.g. 'fold 1: 39/89 answered, 0.85 right'."""
    if c.threshold is None:
        return f"fold {c.fold}: the other folds promised nothing"
    right = f"{c.accuracy:.2f} right" if c.accuracy is not None else "none answered"
    return f"fold {c.fold}: {c.answered}/{c.units} answered at {c.threshold:.2f}, {right}"


def promise_table(promises: list[SelectivePromise]) -> Table:
    """Per target: the threshold, the share to expect answered, and each cross-fitted check's outcome."""
    rows = []
    for p in promises:
        folds = "; ".join(_promise_check(c) for c in p.checked)
        low, high = p.share_interval
        rows.append(
            [
                f"{p.target:.0%} (p {1 - p.delta:.0%})",
                f"{p.threshold:.3f}",
                f"{p.share:.0%} [{low:.0%}, {high:.0%}]",
                folds,
            ]
        )
    return Table(["at least right", "confidence at least", "share answered [95%]", "cross-fitted checks"], rows)


def card_table(rows: list[CardRow]) -> Table:
    """The card check: per figure, the promise and the folder's figure with their 95% intervals, when it
    would be outside, and the verdict."""
    cells = [
        [
            r.figure,
            r.promise(),
            r.value(),
            "all below the level" if r.bound is not None else CARD_SIDES[r.side],
            r.verdict,
        ]
        for r in rows
    ]
    return Table(["figure", "promised [95%]", "this folder [95%]", "outside when", "verdict"], cells)


def card_section(page: Page, rows: list[CardRow]) -> None:
    """An evaluation's card check on its page: which figures fall outside, the table, the rule."""
    outside = [r.figure for r in rows if r.verdict == "outside"]
    page.heading("Model card check", level=2)
    page.text(
        f"This folder falls outside the model card on {len(outside)} of {len(rows)} figures: {'; '.join(outside)}."
        if outside
        else f"This folder is within the model card on all {len(rows)} figures."
    )
    page.table(card_table(rows))
    page.note(CARD_RULE)


def calibration_section(page: Page, checks: dict[str, CalibrationCheck], figures: list[Path]) -> None:
    """An evaluation's calibration per unit on its page: temperature, NLL and ECE raw and calibrated, and
    the reliability diagrams."""
    page.heading("Calibration", level=2)
    page.text(
        "How often the most probable class was right against its confidence: the model's raw probability, "
        "and the confidence answers show (calibrated by the run's temperature per unit; 1 where the run "
        "kept none)."
    )
    rows = [
        [unit, str(c.n), f"{c.temperature:.3f}", f"{c.nll_raw:.3f} -> {c.nll_calibrated:.3f}",
         f"{c.raw.ece:.3f} -> {c.calibrated.ece:.3f}"]
        for unit, c in checks.items()
    ]  # fmt: skip
    page.table(Table(["unit", "n", "temperature", "NLL raw -> calibrated", "ECE raw -> calibrated"], rows))
    for figure in figures:
        page.figure(figure)


def selective_section(page: Page, checks: list[SelectiveCheck]) -> None:
    """An evaluation's selective answers: per target, what was promised and what the folder got."""
    page.heading("Selective answers", level=2)
    page.text(
        "Each target accuracy has a confidence threshold chosen on the run's held-out specimens by "
        "Learn-then-Test: the specimens answered at or above it should be at least that accurate (with the "
        "probability given)."
    )
    page.table(Table(["target", "what this folder got"], [[f"{c.target_accuracy:.0%}", c.summary()] for c in checks]))
