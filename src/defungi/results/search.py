"""What a learning curve (curve.json) and a grid search (grid.json) hold, as typed records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defungi.results.history import EpochRow
from defungi.results.schema import GRID_SCHEMA_VERSION, SCHEMA_VERSION, read_record


@dataclass
class LearningCurve:
    """Scores per fold (rows) and training-set fraction (columns), and every fit's history."""

    train_fractions: list[float]
    cv: int
    folds: int
    train_size: list[list[float]]
    train_f1: list[list[float]]
    train_loss: list[list[float]]
    val_f1: list[list[float]]
    val_loss: list[list[float]]
    seconds: list[list[float]]
    histories: list[list[list[EpochRow]]]  # per fold and training fraction, a fit's epochs
    schema_version: int = SCHEMA_VERSION

    @property
    def label(self) -> str:
        """How the curve was validated: 'K-fold CV' or 'validation set'."""
        return f"{self.cv}-fold CV" if self.cv >= 2 else "validation set"


@dataclass
class GridRow:
    """One cell of a grid: its config values (by dotted key, e.g. 'train.lr') and its fit's validation
    scores (macro-F1 with its 95% interval over specimens, loss, accuracy) and training time."""

    cell: dict[str, Any]
    val_f1: float
    val_f1_interval: list[float]
    val_loss: float
    val_accuracy: float
    train_seconds: float


@dataclass
class GridResult:
    """Every cell's validation scores in a fixed order (last key varies fastest), and the best cell."""

    grid: dict[str, list[Any]]
    rows: list[GridRow]
    best: dict[str, Any]  # the best row's cell
    best_val_f1: float
    trials_before: int
    trials_run: int
    study_name: str
    train_size: int
    schema_version: int = GRID_SCHEMA_VERSION


def read_curve(path: Path) -> LearningCurve:
    """curve.json (see `read_record` for the errors)."""
    return read_record(LearningCurve, path)


def read_grid(path: Path) -> GridResult:
    """grid.json (see `read_record` for the errors)."""
    return read_record(GridResult, path)
