"""Tables of what a run measured about its answers (calibration, prediction sets, selective answers)
and of how an evaluation's answers fared: built from typed records, no model needed."""

from __future__ import annotations

from pathlib import Path

from defungi.report.page import Page, Table
from defungi.results.trust import SetCheck, TemperatureCheck, Trust


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
    if figure is not None:
        page.figure(figure)
