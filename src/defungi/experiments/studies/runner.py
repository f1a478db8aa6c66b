"""A study and its steps, and running them: each step once, finished steps read back, choices carried forward.

A study step is one registered entry, `@study.step(key, title)` on the function that runs it; the
function's return annotation is its result type (`defungi.results.study.StepResult`), which
`defungi.report.study` renders. A study's options (a dataclass next to its steps) live in a
profile's [study] table, not in the run config: its fits' config.json carry none of them.

The study folder holds study.json (`StudyState`: name, config, options, published figures, every
finished step's result) and one folder per step with its fits; `defungi.report.study` draws the page.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from defungi.config import Config, apply_values, load_config_from, nested, profile_table
from defungi.data.dataset import Dataset
from defungi.errors import DefungiError
from defungi.experiments.meter import FitPlan, Probe, current_step, step_plan
from defungi.experiments.protocols import dataset_for, same_images, split_for
from defungi.experiments.rundir import claim_config, write_exclusions
from defungi.layout import StudyLayout
from defungi.results.plan import StepPlan
from defungi.results.schema import to_dict
from defungi.results.study import STEP_RESULTS, StepRecord, StepResult, StudyState, read_study
from defungi.utils import atomic_write_json

log = logging.getLogger(__name__)

RESTART = "use a new --out, or delete it to start again"


@dataclass
class StudyOptions:
    """What every study sizes. A profile's [study] table sets these for every study and [study.NAME]
    for one (with that study's own options); so do --set study.KEY=V and study.NAME.KEY=V."""

    epochs: int = 6  # per exploratory fit (curves, grids, comparisons); final fits use train.epochs (see random_config)
    curve_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    grid_batch_sizes: list[int] = field(default_factory=lambda: [32, 64, 128])
    grid_lrs: list[float] = field(default_factory=lambda: [5e-4, 1e-3, 2e-3, 4e-3])
    final_folds: int = 3  # the final recipe is scored by this K-fold cross-validation, grouped and random
    random_folds: int = 0  # of the random cross-validation's folds, those fitted (0: all; a cheaper estimate)
    # dotted config keys of the random cross-validation's fits alone, over the study's (--epochs too), e.g.
    # {'train.epochs': 20}: near-copies across a random split are learnt over a longer schedule
    random_config: dict[str, Any] = field(default_factory=dict)
    # dotted config keys of the study's fits, e.g. {'train.model_args': {'dim': 128}}
    config: dict[str, Any] = field(default_factory=dict)


O = TypeVar("O", bound=StudyOptions)
F = TypeVar("F", bound=Callable[..., StepResult])


@dataclass
class StudyContext(Generic[O]):
    """What every step sees: the study's config and options, the data, the main split, earlier choices."""

    config: Config
    options: O
    dataset: Dataset
    split: dict[str, np.ndarray]
    out_dir: Path
    choices: dict[str, Any] = field(default_factory=dict)  # carried forward, e.g. {'train.lr': 1e-3}


@dataclass(frozen=True)
class Step:
    """One published step: its key (and folder name), its title, the function that runs it, its result
    type, and the function that lists the fits it will run (its plan; none: it fits nothing)."""

    key: str
    title: str
    run: Callable[[StudyContext[Any], Path], StepResult]
    result_type: type
    plan: Callable[[StudyContext[Any]], list[FitPlan]] | None = None


@dataclass(frozen=True)
class Study(Generic[O]):
    """A published study: the model it develops, its reported test figures, its options, its steps in order."""

    name: str
    model: str
    published: dict[str, float]
    options: type[O]
    steps: list[Step] = field(default_factory=list)

    def step(
        self, key: str, title: str, plan: Callable[[StudyContext[Any]], list[FitPlan]] | None = None
    ) -> Callable[[F], F]:
        """Register the decorated function as the study's next step; its return annotation is its result
        type; plan(ctx) lists the fits it will run."""

        def register(run: F) -> F:
            result_type = typing.get_type_hints(run).get("return")
            if result_type not in STEP_RESULTS:
                raise TypeError(f"step {key!r} returns {result_type}, not a StepResult of defungi.results.study")
            if any(s.key == key for s in self.steps):
                raise ValueError(f"the {self.name} study has a step {key!r} already")
            self.steps.append(Step(key, title, run, result_type, plan))
            return run

        return register


def load_options(studies: Mapping[str, Study[Any]], name: str, profile: str, overrides: dict[str, Any]) -> StudyOptions:
    """The named study's options: its defaults, then the profile's [study] table, then overrides
    (dotted: study.KEY for every study, study.NAME.KEY for one). Every study's section is checked, so
    that a misspelt key is refused whichever study runs."""
    options = {n: s.options() for n, s in studies.items()}
    for table in (profile_table(profile).get("study", {}), nested(overrides).get("study", {})):
        every = {k: v for k, v in table.items() if k not in studies}
        _check_shared(every, studies)
        for n, o in options.items():
            apply_values(o, every, "study.")
            section = table.get(n, {})
            if not isinstance(section, dict):
                raise DefungiError(f"config key 'study.{n}' is a section; set its keys, e.g. study.{n}.epochs")
            apply_values(o, section, f"study.{n}.")
    return options[name]


def _check_shared(keys: dict[str, Any], studies: Mapping[str, Study[Any]]) -> None:
    """Refuse a key given for every study that is not an option of every study, naming its owner if it has one."""
    shared = {f.name for f in dataclasses.fields(StudyOptions)}
    for key in keys.keys() - shared:
        owners = [n for n, s in studies.items() if key in {f.name for f in dataclasses.fields(s.options)}]
        if owners:
            raise DefungiError(f"config key 'study.{key}' is the {owners[0]} study's own; use study.{owners[0]}.{key}")
        raise DefungiError(
            f"unknown config key 'study.{key}'; known: {', '.join(sorted(shared))}, or a study's section: "
            f"{', '.join(studies)}"
        )


def _open(
    study: Study[O], config: Config, out_dir: Path, options: O, dataset: Dataset | None
) -> tuple[StudyLayout, StudyState, StudyContext[O]]:
    """The study folder claimed for this config and options, its state (finished steps read back) and
    the context of its first step; data: the images of config, if loaded already."""
    base, config = config, load_config_from(config, {"train.model": study.model, **options.config})
    layout = StudyLayout(Path(out_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    stored = read_study(layout.state) if layout.state.exists() else None  # an older version's: refused here
    claim_config(layout.config, config, layout.root, RESTART)
    state = StudyState(study.name, study.model, study.published, config.to_dict(), to_dict(options))
    if stored is not None:
        _same_options(stored, state, to_dict(study.options()), layout.root)
        state.steps = stored.steps
    if dataset is None or not same_images(base, config):  # the study's own config may load other images
        dataset = dataset_for(config)
    return layout, state, StudyContext(config, options, dataset, split_for(config, dataset), layout.root)


def _steps(study: Study[O], state: StudyState, ctx: StudyContext[O]) -> Iterator[tuple[int, Step]]:
    """The steps in order, each with the context it runs in: the earlier steps' choices carried forward
    and the split they chose (a step may choose the split ratio); a finished step's result is read back."""
    for number, step in enumerate(study.steps, start=1):
        ctx.split = split_for(load_config_from(ctx.config, ctx.choices), ctx.dataset)
        yield number, step
        record = state.steps.get(step.key)
        if record is not None:
            ctx.choices.update(record.result.choice)


def plan_study(
    study: Study[O], config: Config, out_dir: Path, options: O, probe: Probe, dataset: Dataset | None = None
) -> list[StepPlan]:
    """Each step's plan: the fits it will run and their estimated time (finished steps: done, with
    their measured time). A step's fits that depend on an earlier step's choice are planned with the
    choice as it stands: their number does not depend on it, their sizes may (ConvMixer's split ratio)."""
    _layout, state, ctx = _open(study, config, out_dir, options, dataset)
    plans = []
    for _number, step in _steps(study, state, ctx):
        record = state.steps.get(step.key)
        fits = step.plan(ctx) if step.plan is not None and record is None else []
        plan = step_plan(f"{study.name}/{step.key}", f"{study.name}: {step.title}", fits, probe)
        if record is not None:  # its time as measured, and estimated where a plan was made
            plan.done, plan.seconds, plan.estimate_seconds = True, record.seconds, record.estimate_seconds or 0.0
        plans.append(plan)
    return plans


def run_study(study: Study[O], config: Config, out_dir: Path, options: O, dataset: Dataset | None = None) -> StudyState:
    """Run (or resume) every step of a study into out_dir; returns the study state (study.json)."""
    layout, state, ctx = _open(study, config, out_dir, options, dataset)
    atomic_write_json(layout.state, to_dict(state))
    write_exclusions(layout.excluded, ctx.dataset)
    for number, step in _steps(study, state, ctx):
        if step.key not in state.steps:
            log.info("study %s, step %d/%d: %s", study.name, number, len(study.steps), step.title)
            with current_step(f"{study.name}/{step.key}") as planned:
                state.steps[step.key] = _run_step(step, ctx, layout.step_dir(number, step.key), planned)
            atomic_write_json(layout.state, to_dict(state))
    return state


def _run_step(step: Step, ctx: StudyContext[Any], out: Path, planned: StepPlan | None) -> StepRecord:
    """Run one step into its folder, timed (with the time earlier runs spent on it, and beside its
    estimate, where the job planned it)."""
    t0, before = time.perf_counter(), (planned.seconds or 0.0) if planned is not None else 0.0
    out.mkdir(parents=True, exist_ok=True)
    result = step.run(ctx, out)
    estimate = planned.estimate_seconds if planned is not None else None
    return StepRecord(step.title, before + time.perf_counter() - t0, result, estimate)


def _same_options(stored: StudyState, state: StudyState, defaults: dict[str, Any], folder: Path) -> None:
    """Refuse to resume a study folder with other options than it ran with, naming them; an option
    that a folder of an earlier version lacks ran at its default."""
    changed = sorted(
        k
        for k in stored.options.keys() | state.options.keys()
        if stored.options.get(k, defaults.get(k)) != state.options.get(k)
    )
    if changed:
        keys = ", ".join(f"study.{state.study}.{k}" for k in changed)
        raise DefungiError(f"{folder} holds the study run with other options ({keys}); {RESTART}")
