"""What each command does, as one library call: compute (`experiments`), then draw and write
pages from the files it wrote (`report`). The CLI parses options and calls one of these.

The searches (grid, studies) import Optuna when they run, so that training, evaluating and
predicting work where it is not installed (the GPU check's machine).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from defungi.config import Config, load_config
from defungi.data.audit import audit
from defungi.data.cache import decoding
from defungi.data.dataset import Dataset
from defungi.data.splits import tuning_pool, tuning_split
from defungi.errors import DefungiError
from defungi.experiments.compare import paired_difference
from defungi.experiments.curve import learning_curve, plan_curve
from defungi.experiments.meter import FitPlan, Probe, current_step, export_ahead, planned_job, step_plan
from defungi.experiments.protocols import dataset_for, fit_run, plan_fits, preflight, split_for
from defungi.experiments.rundir import FitRecord, RunDir
from defungi.layout import AuditLayout, RunLayout, SearchLayout, StudyLayout
from defungi.report.audit import build_audit_report
from defungi.report.combined import (
    build_combined_report,
    build_comparison,
    comparison_table,
    final_of,
    read_states,
)
from defungi.report.page import Table
from defungi.report.run import build_evaluation_report, build_run_report
from defungi.report.search import render_curve, render_grid
from defungi.report.study import build_study_report
from defungi.results.plan import StepPlan
from defungi.results.run import Evaluation
from defungi.results.schema import to_dict
from defungi.results.search import GridResult, LearningCurve
from defungi.train import distributed
from defungi.utils import atomic_write_json

log = logging.getLogger(__name__)

TRANSFER_PROFILE = "transfer"


def train_job(config: Config, out: Path, dataset: Dataset | None = None) -> FitRecord | None:
    """Train (or resume, or read back) a run folder, planned (its fits and their estimated time,
    then one progress bar; not a finished run, nor under torchrun), then draw its figures (None: a
    torchrun rank other than 0, which only trained). data: config's images, if loaded already."""
    plan = not RunLayout(out).metrics.exists() and not distributed.world().launched
    if plan:
        run = RunDir(out)
        preflight(config, run)  # refused before any decoding
        if run.layout.config.exists():
            run.claim(config)
        if dataset is None:
            if decoding():  # the CLI's decoding_ahead: this process's core is free meanwhile
                export_ahead(config)
            dataset = dataset_for(config)
    with _one_step("train", f"train {out}", lambda: plan_fits(config, dataset), dataset if plan else None):
        record = fit_run(config, out, dataset)
    if record is not None:
        build_run_report(out)
    return record


@contextlib.contextmanager
def _one_step(name: str, title: str, fits: Callable[[], list[FitPlan]], dataset: Dataset | None) -> Iterator[None]:
    """A job of one step, planned and timed (nothing to plan without data: a finished run read back,
    a worker of a shared grid, or torchrun)."""
    if dataset is None or distributed.world().launched:
        yield
        return
    with planned_job(lambda probe: [step_plan(name, title, fits(), probe)], len(dataset.classes)) as meter:
        with current_step(name) if meter is not None else contextlib.nullcontext():  # None: a larger job's step
            yield


def resume_job(run_dir: Path) -> FitRecord | None:
    """Continue an interrupted run with the config it was started with."""
    return train_job(RunDir(run_dir).config(), run_dir)


def evaluate_job(
    run_dir: Path,
    data: Path,
    out: Path | None,
    tta: bool | None = None,
    prior_weight: float | None = None,
    settings: dict[str, Any] | None = None,
    group_by: str = "name",
) -> tuple[Evaluation, Path]:
    """A run answering a labelled folder as a lab would (serve.evaluate), then its page and figures."""
    from defungi.serve.evaluate import evaluate_folder

    evaluation, folder = evaluate_folder(run_dir, data, out, tta, prior_weight, settings, group_by)
    build_evaluation_report(folder)
    return evaluation, folder


def curve_job(config: Config, out: Path, fraction: float, sizes: list[float], cv: int) -> LearningCurve:
    """A learning curve on `fraction` of the training + validation data: curve.json and its figures."""
    dataset = dataset_for(config)
    dc, layout = config.data, SearchLayout(out)
    pool = tuning_pool(dataset.labels, dataset.specimens, split_for(config, dataset), fraction, dc.split, dc.seed)
    with _one_step("curve", f"learning curve {out}", lambda: plan_curve(config, dataset, pool, sizes, cv), dataset):
        result = learning_curve(config, dataset, pool, sizes, layout.fits, cv=cv)
    atomic_write_json(layout.curve, to_dict(result))
    render_curve(out, f"learning curve, {fraction:.0%} of the data")
    return result


def grid_job(
    config: Config,
    out: Path,
    fraction: float,
    grid: dict[str, list[Any]],
    storage: str | None,
    heartbeat: int | None = None,
) -> GridResult:
    """A grid search on `fraction` of the data (1.0: the main split's parts): grid.json and grid.png."""
    from defungi.experiments.grid import check_cells, grid_search, plan_grid

    check_cells(config, grid)
    dataset = dataset_for(config)
    dc, layout = config.data, SearchLayout(out)
    split = tuning_split(
        dataset.labels, dataset.specimens, split_for(config, dataset), fraction, dc.val_fraction, dc.split, dc.seed
    )
    # a worker of a grid shared through storage fits the cells no other worker took: no plan of its own
    planned = dataset if storage is None else None
    with _one_step("grid", f"grid search {out}", lambda: plan_grid(config, dataset, split, grid), planned):
        result = grid_search(config, dataset, split, grid, layout.fits, storage, heartbeat)
    atomic_write_json(layout.grid, to_dict(result))
    render_grid(out, f"grid search, {fraction:.0%} of the data")
    return result


def study_names() -> list[str]:
    """The published studies, in the order the main job runs them."""
    from defungi.experiments.studies import STUDIES

    return list(STUDIES)


def study_dirs(root: Path) -> list[Path]:
    """Each published study's folder under root (study-NAME)."""
    return [root / f"study-{name}" for name in study_names()]


def study_job(
    name: str,
    config: Config,
    out: Path,
    overrides: dict[str, Any] | None = None,
    dataset: Dataset | None = None,
    profile: str | None = None,
) -> Path:
    """Run (or resume) a published study, planned (its steps' fits and estimated times, then one
    progress bar; plan.json in its folder), sized by the profile's [study] table (profile: a shipped
    name or a lab's .toml file; None: config's, a shipped one) and dotted overrides (study.KEY,
    study.NAME.KEY), then build its page; returns report.html."""
    from defungi.experiments.studies import plan_study, run_study

    dataset = dataset if dataset is not None else dataset_for(config)
    plan = StudyLayout(out).plan
    with planned_job(
        lambda probe: plan_study(name, config, out, probe, overrides, dataset, profile), len(dataset.classes), plan
    ):
        run_study(name, config, out, overrides, dataset, profile)
    return build_study_report(out)


def redraw_job(folder: Path) -> list[Path]:
    """Redraw a study folder's page or a run folder's page and figures from their files; returns the page."""
    if StudyLayout(folder).state.exists():
        return [build_study_report(folder)]
    if RunLayout(folder).metrics.exists():
        return [build_run_report(folder)]
    raise DefungiError(f"{folder}: neither a study folder (study.json) nor a finished run folder (metrics.json)")


def audit_job(root: Path, out: Path, variance_threshold: float) -> Path:
    """The data audit of a folder: audit.json, then audit.html with its figures."""
    atomic_write_json(AuditLayout(out).result, to_dict(audit(root, variance_threshold)))
    return build_audit_report(out)


def compare_job(run_dirs: list[Path], out: Path) -> Path:
    """Finished runs side by side; for two, the paired difference with its interval."""
    difference = paired_difference(run_dirs[0], run_dirs[1]) if len(run_dirs) == 2 else None
    return build_comparison(run_dirs, out, difference)


def report_job(
    study_dirs: list[Path], out: Path, runs: list[Path] | None = None, plan_path: Path | None = None
) -> Path:
    """The combined page of finished study folders, and other finished runs beside them, each paired
    with every study's grouped final recipe where they scored the same images (plan_path: the job's
    plan.json, its estimated and measured times)."""
    from defungi.experiments.compare import paired_difference

    runs, states = runs or [], read_states(study_dirs)
    differences = {}
    for run in runs:
        for study_dir, state in zip(study_dirs, states, strict=True):
            grouped = Path(study_dir) / final_of(state).runs["grouped"]
            try:
                difference = paired_difference(grouped, run, seed=RunDir(run).config().train.seed)
            except DefungiError as error:  # other images: the table beside the studies still shows it
                log.warning("%s", error)
                continue
            differences[f"{run} minus the grouped final recipe of {state.study} (paired)"] = difference
    return build_combined_report(study_dirs, out, runs, plan_path, differences)


def main_job(
    config: Config, out: Path, study_overrides: dict[str, Any] | None = None, profile: str | None = None
) -> tuple[Path, Table]:
    """The main job: every published study (resumable) with its page, sized as study_job's are (profile:
    the one config was loaded from); the transfer recipe (the transfer profile) by grouped
    cross-validation on the same folds as the studies' final recipes; then the combined page. It is
    planned first (every step's fits and estimated time, then one progress bar over the whole job;
    out/plan.json holds the estimates and the measured times). Returns the page and the comparison table."""
    from defungi.experiments.studies import final_folds, plan_study

    dirs, names = study_dirs(out), study_names()
    dataset = dataset_for(config)
    folds = final_folds(names[0], config, study_overrides, profile)
    transfer = load_config(TRANSFER_PROFILE, transfer_overrides(config, folds))
    transfer_out = out / "transfer"
    transfer_data = None if RunLayout(transfer_out).metrics.exists() else dataset_for(transfer)

    def steps(probe: Probe) -> list[StepPlan]:
        plans = [
            p
            for n, d in zip(names, dirs, strict=True)
            for p in plan_study(n, config, d, probe, study_overrides, dataset, profile)
        ]
        fits = plan_fits(transfer, transfer_data) if transfer_data is not None else []
        plans.append(step_plan(TRANSFER_PROFILE, "transfer recipe: grouped cross-validation", fits, probe))
        plans[-1].done = transfer_data is None
        return plans

    plan_path = out / "plan.json"
    with planned_job(steps, len(dataset.classes), plan_path):
        for name, study_dir in zip(names, dirs, strict=True):
            page = study_job(name, config, study_dir, study_overrides, dataset, profile)
            log.info("study %s: report %s", name, page)
        with current_step(TRANSFER_PROFILE):
            log.info("transfer recipe: %s", train_job(transfer, transfer_out, transfer_data).path)
    states = read_states(dirs)
    return report_job(dirs, out / "report", [transfer_out], plan_path), comparison_table(states, [transfer_out])


def transfer_overrides(config: Config, final_folds: int) -> dict[str, Any]:
    """What the transfer run takes from the main job's config: the data, its outlier threshold, split
    and seed, and the studies' number of final folds (so that every recipe is scored on the same folds)."""
    dc = config.data
    return {
        "data.root": dc.root,
        "data.split": "grouped",
        "data.seed": dc.seed,
        "data.cv_folds": final_folds,
    }
