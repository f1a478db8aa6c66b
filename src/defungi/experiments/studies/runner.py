"""Run a study's steps in order, each once: finished steps are read back, choices carried forward.

The study folder holds study.json (name, config, published figures, every finished step's
result as data) and one folder per step with its fits; `defungi.report.study` draws the page.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defungi.config import Config, load_config_from
from defungi.data.dataset import Dataset
from defungi.errors import DefungiError
from defungi.experiments.protocols import dataset_for, split_for
from defungi.experiments.rundir import claim_config, write_exclusions
from defungi.experiments.studies.results import StepResult
from defungi.layout import StudyLayout, read_json
from defungi.utils import atomic_write_json

log = logging.getLogger(__name__)

STATE_FORMAT = 3  # study.json layout; older ones (2: final fits on one split; 1: untyped steps) are not resumed


@dataclass
class StudyContext:
    """What every step sees: the base config, the data, the main split, and earlier choices."""

    config: Config
    data: Dataset
    split: dict[str, np.ndarray]
    out_dir: Path
    choices: dict[str, Any] = field(default_factory=dict)  # carried forward, e.g. {'train.lr': 1e-3}


@dataclass(frozen=True)
class Step:
    """One published step: a title, what it does, and the function that runs it."""

    name: str
    title: str
    run: Callable[[StudyContext, Path], StepResult]


@dataclass(frozen=True)
class StudyDef:
    """A published study: the model it develops, its reported test figures, its steps in order."""

    model: str
    published: dict[str, float]
    steps: list[Step]


STUDIES: dict[str, StudyDef] = {}


def study_config(name: str, config: Config) -> Config:
    """The config a study runs with: its model and its own sizes from the profile (per_study)."""
    study = STUDIES[name]
    return load_config_from(
        config, {"train.model": study.model, **config.study.per_study.get(name, {}), "study.per_study": {}}
    )


def run_study(name: str, config: Config, out_dir: Path) -> dict[str, Any]:
    """Run (or resume) every step of a study into out_dir; returns the study state (study.json)."""
    study = STUDIES[name]
    config = study_config(name, config)
    layout = StudyLayout(Path(out_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    claim_config(layout.config, config, layout.root, "use a new --out, or delete it to start again")
    state = read_json(layout.state) if layout.state.exists() else {"format": STATE_FORMAT, "study": name, "steps": {}}
    if state.get("format") != STATE_FORMAT:
        raise DefungiError(f"{layout.root}: a study folder of an older defungi version; use a new --out")
    state |= {"model": study.model, "published": study.published, "config": config.to_dict()}
    data = dataset_for(config)
    write_exclusions(layout.excluded, data)
    ctx = StudyContext(config, data, split_for(config, data), layout.root)
    for i, step in enumerate(study.steps, start=1):
        done = state["steps"].get(step.name)
        if done is None:
            ctx.split = split_for(load_config_from(config, ctx.choices), data)  # a step may choose the split ratio
            log.info("study %s, step %d/%d: %s", name, i, len(study.steps), step.title)
            t0 = time.perf_counter()
            step_dir = layout.step_dir(i, step.name)
            step_dir.mkdir(parents=True, exist_ok=True)
            done = step.run(ctx, step_dir).to_dict() | {"title": step.title, "seconds": time.perf_counter() - t0}
            state["steps"][step.name] = done
            atomic_write_json(layout.state, state)
        ctx.choices.update(done.get("choice", {}))
    atomic_write_json(layout.state, state)
    return state
