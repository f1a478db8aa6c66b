"""What a run folder's metrics.json and an evaluation's metrics.json hold, as typed records.

Written by `defungi.experiments` and read by everyone else (report, cli, grid, curve, studies)
through `read_run_metrics` / `read_evaluation`: attributes, not string keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from defungi.results.ood import OodCheck
from defungi.results.schema import SCHEMA_VERSION, read_record
from defungi.results.trust import SetCheck, Trust

RunKind = Literal["fit", "ensemble", "cv"]
CardSide = Literal["two-sided", "at least", "at most"]  # which way a figure may leave its promise
Verdict = Literal["within", "outside"]
METRIC_NAMES = ("accuracy", "precision", "recall", "f1")  # macro over the classes with images


@dataclass
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Confusion:
    """A cell of the confusion matrix off its diagonal: how often true was taken for predicted."""

    true: str
    predicted: str
    count: int
    share: float  # of the true class's images


@dataclass
class Reliability:
    """Expected calibration error of the top-class confidence and the reliability table behind it."""

    ece: float
    bins: int
    count: list[int]
    confidence: list[float]
    accuracy: list[float]


@dataclass
class Scores:
    """Macro-averaged scores of one set of decisions (images, or specimens), the per-class table, the
    confusion matrix and 95% intervals from a bootstrap over specimens."""

    n: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    per_class: dict[str, ClassScores]
    confusion_matrix: list[list[int]]
    most_confused: list[Confusion]
    classes: list[str]
    absent_classes: list[str]
    intervals: dict[str, list[float]] = field(default_factory=dict)

    def interval(self, metric: str = "f1") -> list[float] | None:
        """The metric's 95% interval, None when it was not computed."""
        return self.intervals.get(metric)


@dataclass
class PartScores(Scores):
    """A scored part of a run (val, test, out of fold...): per image, per specimen, calibration, and how
    it was scored."""

    samples: Scores | None = None
    calibration: Reliability | None = None
    loss: float | None = None
    tta: bool | None = None
    seconds: float | None = None


@dataclass
class Protocol:
    """How a run was trained and scored."""

    split: str
    seed: int
    image_size: int
    variance_threshold: float
    excluded: int
    sizes: dict[str, int]
    groups: dict[str, int]
    test_time_augmentation: bool
    precision: str  # what the forward passes computed in: float32, bfloat16 or float16
    prior_weight: float
    ensemble: int
    processes: int  # torchrun ranks that trained it (one global batch between them)
    cv_folds: int
    metric_average: str = "macro over classes"
    cv_fit_folds: int = 0  # of the cv_folds, those fitted and scored (0: all)

    def cv(self, name: str = "CV") -> str:
        """'3-fold CV', or '3-fold CV (1 fitted)' where only some folds were."""
        return cv_label(self.cv_folds, self.cv_fit_folds, name)


def cv_label(folds: int, fitted: int = 0, name: str = "CV") -> str:
    """'K-fold CV', or with fewer folds fitted than K, 'K-fold CV (N fitted)'."""
    return f"{folds}-fold {name}" + (f" ({fitted} fitted)" if 0 < fitted < folds else "")


@dataclass
class Timing:
    train_seconds: float
    epochs_run: int
    train_images_per_s: float | None = None
    eval_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class FoldScores:
    """One cross-validation fold's test part."""

    fold: int
    test_images: int
    test_samples: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    sample_accuracy: float
    sample_f1: float

    @property
    def number(self) -> int:
        """The fold as pages, figures and logs count it, 1..K (`fold` indexes its folder, fold-0...)."""
        return self.fold + 1


@dataclass
class Spread:
    mean: float
    std: float
    min: float
    max: float


@dataclass
class MemberScores:
    """One ensemble member: its seed, its run folder and its own macro scores per part."""

    seed: int
    run: str
    parts: dict[str, dict[str, float]]


@dataclass
class RunMetrics:
    """metrics.json of a finished run: what was trained, how, and its scored parts. kind says which
    protocol made it: one fit, an ensemble of seeds (members) or K-fold cross-validation (folds, whose
    'test' part is out of fold)."""

    kind: RunKind
    model: str
    model_args: dict[str, Any]
    classes: list[str]
    protocol: Protocol
    parameters: int
    timing: Timing
    best_epochs: list[int]  # 1-based, one per fit (a fold, a member, or the one fit)
    stop_reason: str
    parts: dict[str, PartScores]
    trust: Trust | None = None  # calibration, prediction sets and selective answers, checked on held-out units
    ood: OodCheck | None = None  # the refusal of non-micrographs, checked on held-out micrographs
    folds: list[FoldScores] = field(default_factory=list)
    fold_spread: dict[str, Spread] = field(default_factory=dict)
    members: list[MemberScores] = field(default_factory=list)
    sample_rule: str = "a sample's decision: the mean of its images' class probabilities, then the most probable class"
    schema_version: int = SCHEMA_VERSION

    def part(self, name: str) -> PartScores:
        """A scored part; a KeyError names the parts there are."""
        if name not in self.parts:
            raise KeyError(f"no part {name!r} (scored: {', '.join(self.parts)})")
        return self.parts[name]

    @property
    def reported(self) -> PartScores:
        """What a run is judged by: its test part (out of fold for a CV), else its validation part."""
        return self.parts.get("test") or self.part("val")

    @property
    def reported_name(self) -> str:
        """'out of fold', 'test' or 'val': what `reported` holds."""
        if "test" not in self.parts:
            return "val"
        return "out of fold" if self.kind == "cv" else "test"


@dataclass
class SelectiveCheck:
    """A selective promise (results.trust.SelectivePromise) checked on a folder: of its n labelled
    specimens, the share answered at the promise's threshold and the accuracy on them, with a 95%
    interval over specimens; beside what was promised (accuracy >= target_accuracy with probability
    1 - delta, a share answered within share_promised)."""

    target_accuracy: float
    threshold: float
    answered: float
    accuracy: float
    interval: list[float]
    delta: float = 0.0  # 0: recorded before promises
    share_promised: list[float] = field(default_factory=list)
    n: int = 0
    n_answered: int = 0
    share_expected: float = 0.0  # the share of the run's held-out specimens answered at the threshold
    accuracy_held_out: float = 0.0  # of those held-out specimens answered (0: recorded before promises)
    share_interval: list[float] = field(default_factory=list)  # of `answered`, over this folder's specimens

    def summary(self) -> str:
        """What was promised and what the folder got, in one line."""
        got = f"{self.accuracy:.2f}" + (f" [{self.interval[0]:.2f}, {self.interval[1]:.2f}]" if self.interval else "")
        expected = (
            f"; expected {self.share_promised[0]:.0%}-{self.share_promised[1]:.0%}" if self.share_promised else ""
        )
        promise = f" (promised at least {self.target_accuracy:.0%}" + (
            f" with probability {1 - self.delta:.0%})" if self.delta else ")"
        )
        return (
            f"answered {self.n_answered} of {self.n} specimens at confidence >= {self.threshold:.2f} "
            f"({self.answered:.0%}{expected}): {got} of them right{promise}"
        )


@dataclass
class CardRow:
    """One figure of an evaluated folder beside what the run promised for it, judged by `card_row`:
    the promise (the model card's figure, or what the run measured on held-out units) and the folder's
    figure, each with its 95% interval over specimens ([] where there is none); bound: the level that a
    one-sided guarantee promises (a prediction set's coverage), where the promise is such a bound."""

    figure: str
    side: CardSide
    promised: float
    promised_interval: list[float]
    measured: float
    measured_interval: list[float]
    verdict: Verdict
    bound: float | None = None

    def promise(self) -> str:
        """'0.655 [0.611, 0.692]', or for a bound 'at least 0.90 (held out: 0.913 [0.889, 0.933])'."""
        held_out = _with_interval(self.promised, self.promised_interval)
        return held_out if self.bound is None else f"{self.side} {self.bound:.2f} (held out: {held_out})"

    def value(self) -> str:
        """The folder's figure with its interval, e.g. '0.561 [0.502, 0.618]'."""
        return _with_interval(self.measured, self.measured_interval)

    def line(self) -> str:
        """e.g. 'image accuracy 0.561 [0.502, 0.618] against 0.655 [0.611, 0.692]'."""
        return f"{self.figure} {self.value()} against {self.promise()}"


def _with_interval(value: float, interval: list[float]) -> str:
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def card_row(
    figure: str,
    side: CardSide,
    promised: float,
    promised_interval: list[float],
    measured: float,
    measured_interval: list[float],
    bound: float | None = None,
) -> CardRow:
    """A figure beside its promise, 'outside' where the folder's figure is further from the promise
    than the draw of specimens behind the two explains. With h the half-width of a 95% interval (0 where
    there is none) and spread = sqrt(h_promised^2 + h_measured^2):
    two-sided (accuracy, macro-F1): outside when |measured - promised| > spread;
    at most (the share refused): outside when measured - promised > spread;
    at least: outside when promised - measured > spread, or, with a bound (a set's coverage >= its
    level: a guarantee, not an estimate), when the measured interval's upper end is below the bound."""
    spread = math.hypot(_half_width(promised_interval), _half_width(measured_interval))
    if bound is not None:
        outside = (measured_interval or [measured, measured])[1] < bound
    else:
        excess = {
            "two-sided": abs(measured - promised),
            "at most": measured - promised,
            "at least": promised - measured,
        }
        outside = excess[side] > spread
    verdict: Verdict = "outside" if outside else "within"
    return CardRow(figure, side, promised, promised_interval, measured, measured_interval, verdict, bound)


def _half_width(interval: list[float]) -> float:
    return (interval[1] - interval[0]) / 2 if interval else 0.0


@dataclass
class CalibrationCheck:
    """How well one unit's confidence (of the most probable class) matched how often it was right on an
    evaluated folder: the raw probabilities and those calibrated by the run's temperature (1 where the
    run kept none), their mean NLL and reliability table (with its ECE)."""

    temperature: float
    n: int
    nll_raw: float
    nll_calibrated: float
    raw: Reliability
    calibrated: Reliability


@dataclass
class Evaluation:
    """metrics.json of `defungi evaluate`: a trained run answering another labelled folder as a lab
    would use it; its scores per image and per specimen (grouped by group_by), its prediction sets'
    empirical coverage at level per unit, and its selective answers when a target accuracy was asked;
    every figure beside the model card's promise (card: scores, every calibrated level's coverage,
    refusals), and its calibration per unit. Files written before card and calibration read as empty."""

    scores: PartScores
    data: str
    run: str
    model: str
    tta: bool
    prior_weight: float
    excluded: list[dict[str, Any]]  # path, label, grey_variance, reason (data.dataset: unreadable or no fungus visible)
    group_by: str = "name"
    variance_threshold: float | None = None  # the run's: under it, no fungus visible (None: written before it was)
    level: float | None = None
    sets: dict[str, SetCheck] = field(default_factory=dict)  # by unit
    selective: SelectiveCheck | None = None  # at the asked target accuracy
    promises: list[SelectiveCheck] = field(default_factory=list)  # at every target the run promised
    ood: OodCheck | None = None  # how many of its images the run refuses as not fungus micrographs
    card: list[CardRow] = field(default_factory=list)  # the card check, a row per figure
    calibration: dict[str, CalibrationCheck] = field(default_factory=dict)  # by unit
    schema_version: int = SCHEMA_VERSION


def read_run_metrics(path: Path) -> RunMetrics:
    """A run's metrics.json (see `read_record` for the errors)."""
    return read_record(RunMetrics, path)


def read_evaluation(path: Path) -> Evaluation:
    """An evaluation's metrics.json."""
    return read_record(Evaluation, path)


@dataclass
class Difference:
    """Second run minus first on one metric, and its 95% interval from a paired bootstrap over specimens."""

    difference: float
    interval: list[float]

    @property
    def clear(self) -> bool:
        """Whether the interval excludes 0 (the difference is more than the draw of specimens)."""
        return self.interval[0] > 0 or self.interval[1] < 0


@dataclass
class PairedDifference:
    """Two runs compared on the same images: per metric, per image and per specimen."""

    images: dict[str, Difference]
    samples: dict[str, Difference]
    n_images: int
    n_samples: int


@dataclass
class ModelCard:
    """What a lab is told about the model that answers: what it is and how well it did on specimens it
    never saw (out of fold for a cross-validation, else its test part), with 95% intervals."""

    model: str
    kind: RunKind
    measured_on: str
    images: int
    specimens: int
    image_accuracy: float
    image_f1: float
    specimen_accuracy: float
    specimen_f1: float
    intervals: dict[str, list[float]]  # image_accuracy, image_f1, specimen_accuracy, specimen_f1

    def summary(self) -> str:
        """One line, e.g. 'efficientnet-lite0 (cv): on 401 specimens never seen ... accuracy 0.79 [0.75, 0.83]'."""

        def value(key: str) -> str:
            low, high = self.intervals.get(key, [float("nan")] * 2)
            return f"{getattr(self, key):.2f} [{low:.2f}, {high:.2f}]"

        return (
            f"{self.model}: on {self.specimens} specimens it never saw ({self.measured_on}), right on "
            f"{value('specimen_accuracy')} of specimens and {value('image_accuracy')} of images (95% intervals)"
        )


def model_card(metrics: RunMetrics) -> ModelCard | None:
    """The card of a run that scored specimens it did not train on (None without a test part)."""
    test = metrics.parts.get("test")
    if test is None or test.samples is None:
        return None
    how = (
        f"{metrics.protocol.cv(f'{metrics.protocol.split} cross-validation')}, out of fold"
        if metrics.kind == "cv"
        else f"the test part of a {metrics.protocol.split} split"
    )
    intervals = {f"image_{k}": test.intervals[k] for k in ("accuracy", "f1") if k in test.intervals}
    intervals |= {f"specimen_{k}": test.samples.intervals[k] for k in ("accuracy", "f1") if k in test.samples.intervals}
    return ModelCard(
        model=metrics.model,
        kind=metrics.kind,
        measured_on=how,
        images=test.n,
        specimens=test.samples.n,
        image_accuracy=test.accuracy,
        image_f1=test.f1,
        specimen_accuracy=test.samples.accuracy,
        specimen_f1=test.samples.f1,
        intervals=intervals,
    )
