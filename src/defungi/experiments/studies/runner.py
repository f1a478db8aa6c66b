"""Run a study's steps in order, each once: finished steps are read back, choices carried forward."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defungi.config import Config, load_config_from, same_config
from defungi.data.dataset import Dataset
from defungi.errors import DefungiError
from defungi.experiments.run import dataset_for, split_for, write_exclusions
from defungi.utils import atomic_write_json

log = logging.getLogger(__name__)


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
    run: Callable[[StudyContext, Path], dict[str, Any]]  # returns {'summary', 'figures', 'choice', ...}


@dataclass(frozen=True)
class StudyDef:
    """A published study: the model it develops, its reported test figures, its steps in order."""

    model: str
    published: dict[str, float]
    steps: list[Step]


def run_study(name: str, config: Config, out_dir: Path) -> dict[str, Any]:
    """Run (or resume) every step of a study into out_dir and build its report."""
    from defungi.report.build import build_study_report

    study = STUDIES[name]
    steps = study.steps
    # this study's own sizes from the profile, then stored without the other studies' ones
    config = load_config_from(config, {"train.model": study.model, **config.study.per_study.get(name, {}), "study.per_study": {}})
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "study.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"study": name, "steps": {}}
    if not same_config(state.get("config", config.to_dict()), config.to_dict()):
        raise DefungiError(f"{out_dir} holds this study run with another config; use a new --out or delete it")
    state["config"] = config.to_dict()
    data = dataset_for(config)
    write_exclusions(out_dir, data)
    ctx = StudyContext(config, data, split_for(config, data), out_dir)
    for i, step in enumerate(steps, start=1):
        done = state["steps"].get(step.name)
        if done is None:
            ctx.split = split_for(load_config_from(config, ctx.choices), data)  # a step may choose the split ratio
            log.info("study %s, step %d/%d: %s", name, i, len(steps), step.title)
            t0 = time.perf_counter()
            step_dir = out_dir / f"{i:02d}-{step.name}"
            step_dir.mkdir(parents=True, exist_ok=True)
            done = step.run(ctx, step_dir) | {"title": step.title, "seconds": time.perf_counter() - t0}
            state["steps"][step.name] = done
            atomic_write_json(state_path, state)
        ctx.choices.update(done.get("choice", {}))
    report = build_study_report(state, out_dir, study.published)
    log.info("study %s finished: report %s", name, report)
    return state | {"report": str(report)}


STUDIES: dict[str, StudyDef] = {}
