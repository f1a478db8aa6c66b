"""The published studies, step by step: `run_study('resnet34' | 'convmixer', config, out)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defungi.config import Config
from defungi.data.dataset import Dataset
from defungi.errors import DefungiError
from defungi.experiments.plan import Probe
from defungi.experiments.studies import runner
from defungi.experiments.studies.convmixer import CONVMIXER
from defungi.experiments.studies.resnet34 import RESNET34
from defungi.experiments.studies.runner import Study
from defungi.results.plan import StepPlan
from defungi.results.study import StudyState

STUDIES: dict[str, Study[Any]] = {s.name: s for s in (RESNET34, CONVMIXER)}  # in the order the main job runs them


def _study(name: str) -> Study[Any]:
    if name not in STUDIES:
        raise DefungiError(f"unknown study '{name}'; known: {', '.join(STUDIES)}")
    return STUDIES[name]


def run_study(
    name: str, config: Config, out_dir: Path, overrides: dict[str, Any] | None = None, data: Dataset | None = None
) -> StudyState:
    """Run (or resume) a study into out_dir, with its options from config's profile and dotted
    overrides (study.KEY, study.NAME.KEY); returns its state (study.json)."""
    study = _study(name)
    return runner.run_study(
        study, config, out_dir, runner.load_options(STUDIES, name, config.profile, overrides or {}), data
    )


def final_folds(name: str, config: Config, overrides: dict[str, Any] | None = None) -> int:
    """The number of folds the study's final recipe is cross-validated on."""
    _study(name)
    return runner.load_options(STUDIES, name, config.profile, overrides or {}).final_folds


def plan_study(
    name: str,
    config: Config,
    out_dir: Path,
    probe: Probe,
    overrides: dict[str, Any] | None = None,
    data: Dataset | None = None,
) -> list[StepPlan]:
    """What run_study would fit, step by step, with each step's estimated time."""
    study = _study(name)
    return runner.plan_study(
        study, config, out_dir, runner.load_options(STUDIES, name, config.profile, overrides or {}), probe, data
    )


__all__ = ["STUDIES", "Study", "final_folds", "plan_study", "run_study"]
