"""What study steps return: typed results, saved as JSON in study.json and drawn by `defungi.report`.

Each result names its `kind`; the report has one renderer per kind and reads nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(kw_only=True)
class StepResult:
    """A step's one-paragraph finding and the choices it carries forward (dotted config keys)."""

    kind: ClassVar[str] = ""
    summary: str
    choice: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(kw_only=True)
class ClassCounts(StepResult):
    """Images per class in named series (before / after balancing)."""

    kind: ClassVar[str] = "class_counts"
    counts: dict[str, dict[str, int]]


@dataclass(kw_only=True)
class Curves(StepResult):
    """Named learning curves (LearningCurve.to_dict() plus pool_size and label)."""

    kind: ClassVar[str] = "curves"
    title: str
    curves: dict[str, dict[str, Any]]


@dataclass(kw_only=True)
class Grid(StepResult):
    """A grid search (GridResult.to_dict()) over batch size and learning rate."""

    kind: ClassVar[str] = "grid"
    title: str
    x_key: str
    y_key: str
    result: dict[str, Any]


@dataclass(kw_only=True)
class FitSummary(StepResult):
    """One exploratory fit scored on the test part: its metrics and per-epoch history."""

    kind: ClassVar[str] = "fit"
    label: str
    test: dict[str, Any]
    history: list[dict[str, float]]


@dataclass(kw_only=True)
class Comparison(StepResult):
    """Variants of one recipe on the same budget: validation metrics and histories."""

    kind: ClassVar[str] = "comparison"
    title: str
    val: dict[str, dict[str, Any]]
    histories: dict[str, list[dict[str, float]]]


@dataclass(kw_only=True)
class SplitRatio(StepResult):
    """Test macro-F1 per train share (rows) and repeat (columns), with the test sizes used (of all
    the usable images) and each fit's 95% interval of its test macro-F1."""

    kind: ClassVar[str] = "split_ratio"
    ratios: list[float]
    labels: list[str]  # '60/40 (test 40.1%)'
    scores: list[list[float]]
    test_sizes: list[list[int]]
    images: int
    intervals: list[list[list[float]]]


@dataclass(kw_only=True)
class Depth(StepResult):
    """Test macro-F1 per depth at the tuned learning rate and with it re-tuned."""

    kind: ClassVar[str] = "depth"
    rows: list[dict[str, Any]]


@dataclass(kw_only=True)
class Final(StepResult):
    """The final recipe scored by K-fold cross-validation per split mode (run folders relative to the
    study folder): out-of-fold metrics, per-fold figures, and random minus grouped (paired, with intervals)."""

    kind: ClassVar[str] = "final"
    runs: dict[str, str]
    test: dict[str, dict[str, Any]]
    folds: dict[str, list[dict[str, Any]]]
    gap: dict[str, Any]
    timing: dict[str, dict[str, Any]]
    parameters: int
    cv_folds: int
    inference_images_per_s: float
