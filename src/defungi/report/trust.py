"""Tables of what a run measured about its answers (calibration, prediction sets, selective answers)
and of how an evaluation's answers fared: built from typed records, no model needed."""

from __future__ import annotations

from pathlib import Path

from defungi.report.page import Page, Table
from defungi.results.trust import SelectivePromise, SetCheck, TemperatureCheck, Trust


def temperature_table(temperatures: dict[str, TemperatureCheck]) -> Table:
    """Per unit: the temperature, NLL and ECE before and after where it was checked, and whether kept."""
    rows = [
        [unit, f"{t.temperature:.3f}", f"{t.nll_before:.3f} -> {t.nll_after:.3f}",
         f"{t.ece_before:.3f} -> {t.ece_after:.3f}", f"fitted on {t.fitted_on}, checked on {t.checked_on}",
         "yes" if t.kept else "no (it did not lower both)"]
        for unit, t in temperatures.items()
    ]  # fmt: skip
    return Table(["unit", "temperature", "NLL", "ECE", "where", "kept"], rows)


def set_table(checks: dict[str, SetCheck], level: float) -> Table:
    """Per named check: coverage and mean set size with 95% intervals over specimens, singletons, and
    the coverage and size per class."""
    rows = []
    for name, c in checks.items():
        low, high = c.coverage_interval
        size_low, size_high = c.size_interval
        per_class = ", ".join(f"{k} {v.coverage:.2f} ({v.mean_size:.1f})" for k, v in c.per_class.items())
        rows.append(
            [name, f"{c.coverage:.3f} [{low:.3f}, {high:.3f}]", f"{c.mean_size:.2f} [{size_low:.2f}, {size_high:.2f}]",
             f"{c.singleton_share:.0%}", str(c.n), per_class]
        )  # fmt: skip
    head = [f"sets at {level:.0%}", "coverage [95%]", "mean size [95%]", "one class", "n", "per class: coverage (size)"]
    return Table(head, rows)


def trust_section(page: Page, trust: Trust, figure: Path | None = None) -> None:
    """A run's trust measurements on its page: calibration, sets per level and unit, selective answers."""
    page.heading("How far its answers can be trusted", level=2)
    page.text(
        f"Measured on {trust.source} predictions, each checked on specimens that did not fit it (cross-fitted): "
        "a temperature is kept only where it lowered both the NLL and the expected calibration error there."
    )
    page.table(temperature_table(trust.temperatures))
    for s in trust.sets:
        checks = {f"{s.unit}, {mode}{' (answers)' if mode == s.mode else ''}": c for mode, c in s.checked.items()}
        page.table(set_table(checks, s.level))
    rows = [[f"{r.coverage:.0%}", f"{r.accuracy:.3f} [{r.interval[0]:.3f}, {r.interval[1]:.3f}]", f"{r.threshold:.3f}"]
            for r in trust.selective.table]  # fmt: skip
    page.heading("Selective answers", level=3)
    page.table(Table(["specimens answered", "accuracy [95%]", "confidence at least"], rows))
    if trust.selective.promises:
        page.text(
            "Promises for `--target-accuracy`: the threshold Learn-then-Test chooses on every held-out specimen, "
            "and what the threshold chosen on the other folds delivered on each fold (cross-fitted)."
        )
        page.table(promise_table(trust.selective.promises))
    if figure is not None:
        page.figure(figure)


def promise_table(promises: list[SelectivePromise]) -> Table:
    """Per target: the threshold, the share to expect answered, and each cross-fitted check's outcome."""
    rows = []
    for p in promises:
        folds = "; ".join(
            f"fold {c.fold}: {c.answered}/{c.units} answered, "
            + (f"{c.accuracy:.2f} right" if c.accuracy is not None else "none answered")
            for c in p.checked
        )
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
