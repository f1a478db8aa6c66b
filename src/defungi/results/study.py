"""What a study folder's study.json holds, as typed records: the study, the config and options it ran
with, its published figures and every finished step's result.

Written by `defungi.experiments.studies` and read by `defungi.report` through `read_study`. A step
result names its type in a Literal `kind` field, which picks its class when study.json is read back;
`StepResult` lists every result type (a new type goes there, and gets one renderer in
`defungi.report.study`). No torch here.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from defungi.results.history import EpochRow
from defungi.results.run import FoldScores, PairedDifference, PartScores, Timing
from defungi.results.schema import GRID_SCHEMA_VERSION, read_record
from defungi.results.search import GridResult, LearningCurve

R = TypeVar("R")


@dataclass(kw_only=True)
class Finding:
    """A step's one-paragraph finding and the choices it carries forward (dotted config keys)."""

    summary: str
    choice: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class ClassCounts(Finding):
    """Images per class in named series (before / after balancing)."""

    kind: Literal["class_counts"] = "class_counts"
    counts: dict[str, dict[str, int]]


@dataclass
class NamedCurve:
    """A study's learning curve: on a pool of pool_size images, validated as label says."""

    label: str  # 'validation set' or 'K-fold cross-validation'
    pool_size: int
    curve: LearningCurve


@dataclass(kw_only=True)
class Curves(Finding):
    """Learning curves by name (e.g. '3-fold CV' beside 'validation set')."""

    kind: Literal["curves"] = "curves"
    curves: dict[str, NamedCurve]


@dataclass(kw_only=True)
class Grid(Finding):
    """A grid search over batch size (y) and learning rate (x)."""

    kind: Literal["grid"] = "grid"
    x_key: str
    y_key: str
    result: GridResult


@dataclass(kw_only=True)
class FitSummary(Finding):
    """One exploratory fit scored on the test part: its metrics and per-epoch history."""

    kind: Literal["fit"] = "fit"
    label: str
    test: PartScores
    history: list[EpochRow]


@dataclass(kw_only=True)
class Comparison(Finding):
    """Variants of one recipe on the same budget: validation metrics and histories by variant."""

    kind: Literal["comparison"] = "comparison"
    val: dict[str, PartScores]
    histories: dict[str, list[EpochRow]]


@dataclass(kw_only=True)
class SplitRatio(Finding):
    """Test macro-F1 per train share (rows) and repeat (columns), with the test sizes used (of all
    the usable images) and each fit's 95% interval of its test macro-F1."""

    kind: Literal["split_ratio"] = "split_ratio"
    ratios: list[float]
    labels: list[str]  # '60/40 (test 40.1%)'
    scores: list[list[float]]
    test_sizes: list[list[int]]
    images: int
    intervals: list[list[list[float]]]


@dataclass
class DepthRow:
    """One depth's test macro-F1 at the learning rate tuned for 8 mixers and with it re-tuned on validation."""

    depth: int
    tuned_for_8: float
    tuned_for_8_interval: list[float]
    retuned: float
    retuned_lr: float
    val_retuned: float


@dataclass(kw_only=True)
class Depth(Finding):
    """Test macro-F1 per depth at the tuned learning rate and with it re-tuned."""

    kind: Literal["depth"] = "depth"
    rows: list[DepthRow]


@dataclass(kw_only=True)
class Final(Finding):
    """The final recipe scored by K-fold cross-validation per split mode (run folders relative to the
    study folder): out-of-fold metrics, per-fold figures, and random minus grouped (paired, with intervals)."""

    kind: Literal["final"] = "final"
    runs: dict[str, str]
    test: dict[str, PartScores]
    folds: dict[str, list[FoldScores]]
    gap: PairedDifference
    timing: dict[str, Timing]
    parameters: int
    cv_folds: int
    inference_images_per_s: float


StepResult = ClassCounts | Curves | Grid | FitSummary | Comparison | SplitRatio | Depth | Final
STEP_RESULTS: tuple[type, ...] = typing.get_args(StepResult)


@dataclass
class StepRecord:
    """A finished step: its title, how long it ran, its result, and its estimated time (where the job
    that ran it planned it)."""

    title: str
    seconds: float
    result: StepResult
    estimate_seconds: float | None = None


@dataclass
class StudyState:
    """study.json: the study, the model it develops, its published figures, the config its fits start
    from (`Config.to_dict()`), its own options, and its finished steps by key, in the order they ran."""

    study: str
    model: str
    published: dict[str, float]
    config: dict[str, Any]
    options: dict[str, Any]
    steps: dict[str, StepRecord] = field(default_factory=dict)
    schema_version: int = GRID_SCHEMA_VERSION  # it holds grids (see GridResult)

    def result(self, of: type[R]) -> R | None:
        """The result of the last finished step of that type (None: no such step has finished)."""
        found = [s.result for s in self.steps.values() if isinstance(s.result, of)]
        return found[-1] if found else None

    @property
    def explore_epochs(self) -> int:
        """Epochs of an exploratory fit (curves, grids, comparisons): an option every study has."""
        return int(self.options["epochs"])


def read_study(path: Path) -> StudyState:
    """study.json (see `read_record` for the errors: a folder of an older version is refused in one line)."""
    return read_record(StudyState, path)
