"""Both studies' final models on one page, beside the published figures, from the study folders alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from defungi.errors import DefungiError
from defungi.layout import RunLayout, StudyLayout
from defungi.report.page import Page, Table, difference_table, interval_table
from defungi.report.run import render_run
from defungi.report.study import final_rows
from defungi.results.plan import JobPlan, read_plan
from defungi.results.run import PairedDifference, Scores, read_run_metrics
from defungi.results.study import Final, StudyState, read_study
from defungi.utils import clock


def read_states(study_dirs: list[Path]) -> list[StudyState]:
    """The study.json of each folder; a folder that is not a finished study is a clear error."""
    states = []
    for study_dir in study_dirs:
        path = StudyLayout(study_dir).state
        if not path.exists():
            raise DefungiError(
                f"{study_dir}: not a study folder (no study.json); run 'defungi study NAME --out {study_dir}' first"
            )
        state = read_study(path)
        if state.result(Final) is None:
            raise DefungiError(
                f"{study_dir}: the study has no final step yet; run 'defungi study {state.study} --out "
                f"{study_dir}' first"
            )
        states.append(state)
    return states


def final_of(state: StudyState) -> Final:
    """A finished study's final step (`read_states` admits no other)."""
    final = state.result(Final)
    if final is None:
        raise DefungiError(f"the {state.study} study has no final step yet")
    return final


def comparison_table(states: list[StudyState], runs: Sequence[Path] = ()) -> Table:
    """Each study's final recipe by grouped and random cross-validation, per image and per specimen,
    with 95% intervals, beside its published figures; then other finished runs scored the same way."""
    rows: dict[str, Scores | dict[str, Any]] = {}
    for state in states:
        rows |= final_rows(state.study, final_of(state), state.published)
    return interval_table(rows | run_rows(list(runs)))


def build_combined_report(
    study_dirs: list[Path],
    out_dir: Path,
    runs: list[Path] | None = None,
    plan_path: Path | None = None,
    differences: dict[str, PairedDifference] | None = None,
) -> Path:
    """Metrics with intervals, the leakage gap, confusion matrices, parameters, training time and
    inference images/s of every study's final recipe on one page, and other finished runs (e.g. the
    transfer recipe) beside them, with differences (paired, by title: e.g. a run minus a study's
    grouped recipe); with plan_path (the job's plan.json), every step's estimated and measured time;
    returns the HTML path."""
    states = read_states(study_dirs)
    finals = [final_of(state) for state in states]
    page = Page("defungi: both final models beside the published study")
    page.text(
        "Out-of-fold test metrics of each study's final recipe under K-fold cross-validation over every specimen, "
        "macro-averaged over the classes, with 95% intervals from a bootstrap over specimens. Grouped: no "
        "specimen in two parts (what a new specimen will see); random: the published protocol, where near-copies of "
        "a test image sit in training. Per specimen: the mean probability of its images decides."
    )
    page.table(comparison_table(states))
    details = [
        [
            state.study,
            f"{final.parameters / 1e6:.2f} M",
            f"{final.timing['grouped'].train_seconds / 60:.1f} min",
            f"{final.inference_images_per_s:.0f}",
        ]
        for state, final in zip(states, finals, strict=True)
    ]
    header = ["model", "parameters", "training time (all folds of the grouped CV)", "inference images/s (one model)"]
    page.table(Table(header, details))
    if runs:
        page.heading("Beside the studies", level=2)
        page.text(
            "Other recipes scored the same way (out of fold, on the same grouped folds when they use the same seed "
            "and number of folds as the studies' final step)."
        )
        page.table(interval_table(run_rows(runs)))
        for title, difference in (differences or {}).items():
            page.heading(title, level=3)
            page.table(difference_table(difference))
    for study_dir, state, final in zip(study_dirs, states, finals, strict=True):
        page.heading(f"{state.study}: random minus grouped (the leakage inflation)", level=3)
        page.table(difference_table(final.gap))
        for mode, run in final.runs.items():
            layout = RunLayout(Path(study_dir) / run)
            if not layout.figure("confusion_test").exists():
                render_run(layout.root)
            page.heading(f"{state.study}, {mode} cross-validation", level=3)
            page.figure(layout.figure("confusion_test"))
            page.figure(layout.figure("confusion_test_samples"))
    if plan_path is not None and plan_path.exists():
        _time_section(page, read_plan(plan_path))
    return page.write(out_dir)


def _time_section(page: Page, job: JobPlan) -> None:
    """The job's plan on the page: the probed speeds, then each step's estimate and measured time."""
    page.heading("Time: the plan's estimate and the measured time of each step", level=2)
    speeds = "; ".join(
        f"{r.model} ({r.precision}) trains at {r.train_images_per_s:.0f} images/s, answers at {r.eval_images_per_s:.0f}"
        for r in job.rates
    )
    page.text(
        f"Estimated before the work from a short probe of each model's speed on this machine (CPU flags: "
        f"{job.cpu}; {job.threads} threads): {speeds}. Fits and epochs are at most: early stopping ends fits "
        "sooner. A step resumed across runs sums their times."
    )
    page.table(plan_table(job))


def plan_table(plan: JobPlan) -> Table:
    """Each step's fits, epochs and images (at most), its estimate and its measured time."""
    rows = [
        [s.title, str(s.fits), str(s.epochs), f"{s.images:,}", clock(s.estimate_seconds), clock(s.seconds)]
        for s in plan.steps
    ]
    rows.append(
        [
            "whole job",
            str(plan.fits),
            str(plan.epochs),
            f"{plan.images:,}",
            clock(plan.estimate_seconds),
            clock(plan.seconds),
        ]
    )
    header = ["step", "fits", "epochs", "training images", "estimate", "measured"]
    return Table(header, rows)


def run_rows(run_dirs: list[Path]) -> dict[str, Scores]:
    """Each finished run's scored images (out of fold for a CV run), per image and per specimen, as named rows."""
    rows: dict[str, Scores] = {}
    for run_dir in run_dirs:
        path = RunLayout(Path(run_dir)).metrics
        if not path.exists():
            raise DefungiError(f"{run_dir}: not a finished run folder (no metrics.json)")
        m = read_run_metrics(path)
        if "test" not in m.parts:
            raise DefungiError(f"{run_dir}: the run scored no test part; train it with a test part or --cv K")
        test, protocol = m.parts["test"], m.protocol
        how = protocol.cv() if m.kind == "cv" else "one split"
        name = f"{run_dir} ({m.model}, {protocol.split} {how})"
        rows[f"{name}, per image"] = test
        if test.samples is not None:
            rows[f"{name}, per specimen"] = test.samples
    return rows


def build_comparison(run_dirs: list[Path], out_dir: Path, difference: PairedDifference | None = None) -> Path:
    """Finished runs (e.g. one recipe under grouped and random cross-validation) side by side: image-
    and specimen-level metrics with their 95% intervals over specimens; with the paired difference of two
    runs (`defungi.experiments.compare`), its table. Returns the HTML path."""
    rows = run_rows(run_dirs)
    page = Page("defungi: runs side by side")
    page.text(
        "Out-of-fold scores for cross-validation runs, test-part scores otherwise; macro-averaged over the classes, "
        "95% intervals from a bootstrap over specimens. Per specimen: its images pooled by the run's "
        "train.specimen_rule (the mean probability unless the run says otherwise)."
    )
    page.table(interval_table(rows))
    if difference is not None:
        page.heading("Second run minus first", level=2)
        page.text(
            f"On the same {difference.n_images} images ({difference.n_samples} samples); the interval comes "
            "from a bootstrap that draws specimens and scores both runs on each draw."
        )
        page.table(difference_table(difference))
    return page.write(out_dir)
