"""Where each file of a run folder and a study folder lives, and how their plain files are read.

The one place these names are spelled: `experiments.rundir` writes and resumes through them,
`report` renders from them, `serve` loads through `experiments.rundir`. No torch here.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defungi.errors import DefungiError
from defungi.results.history import EpochRow
from defungi.results.schema import SchemaError, from_dict


@dataclass(frozen=True)
class RunLayout:
    """The files of one training run's folder (an ensemble adds one run folder per member, a
    cross-validation one per fold)."""

    root: Path

    @property
    def config(self) -> Path:
        """The full config the run was started with (a run resumes only with the same one)."""
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        """Written last: its presence means the run is finished."""
        return self.root / "metrics.json"

    @property
    def history(self) -> Path:
        """One row per epoch: loss, accuracy, validation macro-F1, images/s."""
        return self.root / "history.csv"

    @property
    def split(self) -> Path:
        """Every usable image with its class, specimen and part."""
        return self.root / "split.csv"

    @property
    def excluded(self) -> Path:
        """Outliers and unreadable files left out."""
        return self.root / "excluded.csv"

    @property
    def best(self) -> Path:
        """Weights with the best validation macro-F1 (what evaluate/predict load, unless the run was
        scored at its last epoch: train.restore_best = false)."""
        return self.root / "best.pt"

    @property
    def onnx(self) -> Path:
        """The model exported for onnxruntime, with what predict needs in its metadata ('defungi export')."""
        return self.root / "model.onnx"

    @property
    def last(self) -> Path:
        """The last epoch's full training state (what a resume continues from)."""
        return self.root / "last.pt"

    @property
    def ood(self) -> Path:
        """The fit's refusal of non-micrographs: its detector and threshold, next to best.pt (see train.ood)."""
        return self.root / "ood.npz"

    def member(self, k: int) -> RunLayout:
        """The run folder of ensemble member k."""
        return RunLayout(self.root / f"member-{k}")

    def fold(self, k: int) -> RunLayout:
        """The run folder of cross-validation fold k (its test part: the k-th fold's specimens)."""
        return RunLayout(self.root / f"fold-{k}")

    def predictions(self, part: str) -> Path:
        """Per image of a scored part: path, specimen, class, prediction, probability per class."""
        return self.root / f"predictions_{part}.csv"

    @property
    def oof(self) -> Path:
        """Cross-validation: every usable image scored once, by the fold model that never saw its specimen."""
        return self.root / "oof.csv"

    def figure(self, name: str) -> Path:
        """A figure drawn from the run's files (training_curves, confusion_test, refused, excluded...)."""
        return self.root / f"{name}.png"

    def evaluation(self, name: str) -> EvaluationLayout:
        """Where `defungi evaluate` on a folder called name writes by default."""
        return EvaluationLayout(self.root / "evaluations" / name)

    @property
    def page(self) -> PageLayout:
        """The run's page (`defungi report RUN`)."""
        return PageLayout(self.root)


@dataclass(frozen=True)
class PageLayout:
    """A page of a folder, written twice from the same blocks: HTML (figures embedded, readable
    offline) and Markdown (figures linked)."""

    root: Path
    stem: str = "report"

    @property
    def html(self) -> Path:
        return self.root / f"{self.stem}.html"

    @property
    def markdown(self) -> Path:
        return self.root / f"{self.stem}.md"


@dataclass(frozen=True)
class EvaluationLayout:
    """The files of one evaluation of a trained run on a labelled folder."""

    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions(self) -> Path:
        """Per image: path, specimen, true class, prediction, calibrated confidence, set, out-of-distribution
        score, probabilities."""
        return self.root / "predictions.csv"

    @property
    def specimens(self) -> Path:
        """Per specimen: true class, decision, confidence, set, answer, right or wrong."""
        return self.root / "specimens.csv"

    def figure(self, name: str) -> Path:
        """confusion (images), confusion_specimens, confident_errors, reliability_image, reliability_specimen,
        refused, excluded."""
        return self.root / f"{name}.png"

    @property
    def confusion(self) -> Path:
        return self.figure("confusion")

    @property
    def page(self) -> PageLayout:
        return PageLayout(self.root)


@dataclass(frozen=True)
class StudyLayout:
    """The files of a study folder: its state (steps as data), one folder per step, the report."""

    root: Path

    @property
    def state(self) -> Path:
        """study.json: the study's name, config, published figures and every finished step's result."""
        return self.root / "study.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def excluded(self) -> Path:
        return self.root / "excluded.csv"

    @property
    def plan(self) -> Path:
        """plan.json: the steps' estimated and measured times (`defungi.results.plan`)."""
        return self.root / "plan.json"

    def step_dir(self, number: int, name: str) -> Path:
        """The folder of step `number` (1-based), e.g. 02-curve20."""
        return self.root / f"{number:02d}-{name}"

    @staticmethod
    def step_figure(step_dir: Path, name: str) -> Path:
        """A figure of a step's page, in its folder (learning_curve, grid, confusion_test...)."""
        return step_dir / f"{name}.png"


@dataclass(frozen=True)
class AuditLayout:
    """The files of a data audit (`defungi data audit`): the result and the page's figures."""

    root: Path

    @property
    def result(self) -> Path:
        return self.root / "audit.json"

    @property
    def page(self) -> PageLayout:
        return PageLayout(self.root, "audit")

    def figure(self, name: str) -> Path:
        return self.root / f"{name}.png"


def _unreadable(path: Path, what: str, exc: Exception) -> DefungiError:
    return DefungiError(f"{path}: not a readable {what} ({type(exc).__name__}); delete it and run again")


def read_json(path: Path) -> Any:
    """A JSON file written by this package; one line naming the file when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _unreadable(path, "JSON file", exc) from None


def read_table(path: Path, columns: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """A CSV file with a header row, as a list of dicts of strings; one line naming the file when it
    cannot be read, lacks one of columns, or has a row of another length."""
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:  # as atomic_write_text wrote
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _unreadable(path, "CSV table", exc) from None
    missing = [c for c in columns if c not in header]
    ragged = next((n for n, row in enumerate(rows, 2) if None in row or None in row.values()), None)
    if missing or ragged:
        what = f"no column '{missing[0]}'" if missing else f"line {ragged} has {len(header)} fields"
        raise DefungiError(f"{path}: not the table defungi wrote ({what}); delete it and run again")
    return rows


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def read_history(path: Path) -> list[EpochRow]:
    """history.csv, one typed row per epoch."""
    if Path(path).stat().st_size <= 2:  # no header: a run of several fits keeps its histories in its parts
        return []
    rows = read_table(path, ("epoch",))
    try:
        return [from_dict(EpochRow, {k: _number(v) for k, v in row.items()}) for row in rows]
    except (ValueError, SchemaError) as exc:
        raise DefungiError(f"{path}: not the table defungi wrote ({exc}); delete it and run again") from None


@dataclass(frozen=True)
class SearchLayout:
    """The files of a stand-alone learning curve or grid search (`defungi curve`, `defungi grid`)."""

    root: Path

    @property
    def fits(self) -> Path:
        """One run folder per fit."""
        return self.root / "fits"

    @property
    def curve(self) -> Path:
        return self.root / "curve.json"

    @property
    def grid(self) -> Path:
        return self.root / "grid.json"

    def figure(self, name: str) -> Path:
        return self.root / f"{name}.png"


def read_predictions(path: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """A predictions CSV: the image paths and their class probabilities (one row per image)."""
    rows = read_table(path)
    return [r["path"] for r in rows], np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
