"""The published studies, step by step: `run_study('resnet34' | 'convmixer', config, out)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defungi.config import Config
from defungi.errors import DefungiError
from defungi.experiments.studies import runner
from defungi.experiments.studies.convmixer import CONVMIXER
from defungi.experiments.studies.resnet34 import RESNET34
from defungi.experiments.studies.runner import Study
from defungi.results.study import StudyState

STUDIES: dict[str, Study[Any]] = {s.name: s for s in (RESNET34, CONVMIXER)}  # in the order the main job runs them


def run_study(name: str, config: Config, out_dir: Path, overrides: dict[str, Any] | None = None) -> StudyState:
    """Run (or resume) a study into out_dir, with its options from config's profile and dotted
    overrides (study.KEY, study.NAME.KEY); returns its state (study.json)."""
    if name not in STUDIES:
        raise DefungiError(f"unknown study '{name}'; known: {', '.join(STUDIES)}")
    study = STUDIES[name]
    return runner.run_study(study, config, out_dir, runner.load_options(STUDIES, name, config.profile, overrides or {}))


__all__ = ["STUDIES", "Study", "run_study"]
