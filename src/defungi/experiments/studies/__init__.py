"""The published studies, step by step: `run_study('resnet34' | 'convmixer', config, out)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defungi.config import Config
from defungi.data.dataset import Dataset
from defungi.errors import DefungiError
from defungi.experiments.meter import Probe
from defungi.experiments.studies import runner
from defungi.experiments.studies.convmixer import CONVMIXER
from defungi.experiments.studies.resnet34 import RESNET34
from defungi.experiments.studies.runner import Study, StudyOptions
from defungi.results.plan import StepPlan
from defungi.results.study import StudyState

STUDIES: dict[str, Study[Any]] = {s.name: s for s in (RESNET34, CONVMIXER)}  # in the order the main job runs them


def _study(name: str) -> Study[Any]:
    if name not in STUDIES:
        raise DefungiError(f"unknown study '{name}'; known: {', '.join(STUDIES)}")
    return STUDIES[name]


def _options(name: str, config: Config, overrides: dict[str, Any] | None, profile: str | None) -> StudyOptions:
    """The named study's options: the [study] table of profile (a shipped name or a .toml file; None:
    config's profile, by its name: a shipped one), then dotted overrides (study.KEY, study.NAME.KEY)."""
    _study(name)
    return runner.load_options(STUDIES, name, profile or config.profile, overrides or {})


def run_study(
    name: str,
    config: Config,
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
    dataset: Dataset | None = None,
    profile: str | None = None,
) -> StudyState:
    """Run (or resume) a study into out_dir, with its options from the profile (see _options) and dotted
    overrides; returns its state (study.json)."""
    return runner.run_study(_study(name), config, out_dir, _options(name, config, overrides, profile), dataset)


def final_folds(name: str, config: Config, overrides: dict[str, Any] | None = None, profile: str | None = None) -> int:
    """The number of folds the study's final recipe is cross-validated on."""
    return _options(name, config, overrides, profile).final_folds


def plan_study(
    name: str,
    config: Config,
    out_dir: Path,
    probe: Probe,
    overrides: dict[str, Any] | None = None,
    dataset: Dataset | None = None,
    profile: str | None = None,
) -> list[StepPlan]:
    """What run_study would fit, step by step, with each step's estimated time."""
    options = _options(name, config, overrides, profile)
    return runner.plan_study(_study(name), config, out_dir, options, probe, dataset)


__all__ = ["STUDIES", "Study", "final_folds", "plan_study", "run_study"]
