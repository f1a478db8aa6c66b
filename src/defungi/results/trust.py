"""What a run says about how far its answers can be trusted: calibration that was checked,
conformal prediction sets with their measured coverage, and selective answers (risk-coverage)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Unit = Literal["image", "specimen"]
DEFAULT_COVERAGE = 0.9  # the level of the prediction sets answers show (CLI and page alike)
DEFAULT_ABSTAIN = 0.0  # images answered 'uncertain' under this calibrated confidence (CLI and page alike)
SetMode = Literal["marginal", "class-conditional"]


@dataclass
class TemperatureCheck:
    """A temperature fitted by NLL on some units' probabilities and checked on others: kept only where
    it lowered both the NLL and the expected calibration error there."""

    unit: Unit
    temperature: float
    fitted_on: str
    checked_on: str
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    kept: bool

    @property
    def applied(self) -> float:
        """The temperature answers use: the fitted one if it helped, else 1 (none)."""
        return self.temperature if self.kept else 1.0


@dataclass
class ClassCoverage:
    coverage: float
    mean_size: float
    n: int


@dataclass
class SetCheck:
    """Prediction sets measured on units their thresholds were not calibrated on: the share that hold
    the true class and their size, with 95% intervals from a bootstrap over specimens."""

    coverage: float
    coverage_interval: list[float]
    mean_size: float
    size_interval: list[float]
    singleton_share: float
    n: int
    per_class: dict[str, ClassCoverage]


@dataclass
class ConformalSets:
    """Split-conformal thresholds (on 1 - p) at one coverage level and unit: marginal and per class;
    mode says which ones answer (class-conditional where a class fell short of the level)."""

    level: float
    unit: Unit
    marginal: float
    per_class: dict[str, float]
    mode: SetMode
    calibration_units: int
    checked: dict[str, SetCheck] = field(default_factory=dict)  # by mode

    def threshold(self, classes: list[str]) -> list[float]:
        """The threshold of every class, in the classes' order, under the chosen mode."""
        return [self.per_class[c] if self.mode == "class-conditional" else self.marginal for c in classes]


@dataclass
class SelectiveRow:
    coverage: float
    accuracy: float
    interval: list[float]
    threshold: float


@dataclass
class PromiseCheck:
    """A selective promise cross-fitted: its threshold chosen on the other folds' specimens, then applied
    to this fold's (fold 1..K; 0: the test part of one split, chosen on the validation part)."""

    fold: int
    threshold: float | None  # None: no threshold was shown to reach the target there
    units: int
    answered: int
    accuracy: float | None  # on the answered ones (None: none answered)


@dataclass
class SelectivePromise:
    """With probability at least 1 - delta, at least `target` of the specimens answered at calibrated
    confidence >= threshold are right (Learn-then-Test on `units` held-out specimens, see
    stats.selective); `share` of specimens to expect answered, with its 95% interval."""

    target: float
    delta: float
    threshold: float
    share: float
    share_interval: list[float]
    accuracy: float  # on the held-out specimens it was chosen on
    units: int
    checked: list[PromiseCheck] = field(default_factory=list)

    def summary(self) -> str:
        """The promise in one line, as answers print it."""
        low, high = self.share_interval
        return (
            f"specimens answered at confidence >= {self.threshold:.2f} are at least {self.target:.0%} right "
            f"(a promise that holds with probability {1 - self.delta:.0%}, from {self.units} held-out specimens); "
            f"expect {self.share:.0%} [{low:.0%}, {high:.0%}] of specimens answered, the others 'not sure'"
        )


@dataclass
class RiskCoverage:
    """Accuracy against the share of units answered, most confident first (confidence: calibrated), over
    `units` held-out units; the promises checked at stats.selective.TARGETS."""

    unit: Unit
    thresholds: list[float]
    coverage: list[float]
    accuracy: list[float]
    table: list[SelectiveRow]
    units: int = 0  # 0: a run from before promises (see train.assess.selective_promise)
    promises: list[SelectivePromise] = field(default_factory=list)


@dataclass
class Trust:
    """Everything above for one run, from held-out predictions (out of fold, or validation + test)."""

    source: str
    temperatures: dict[str, TemperatureCheck]  # by unit
    sets: list[ConformalSets]
    selective: RiskCoverage

    def conformal(self, level: float, unit: Unit) -> ConformalSets:
        """The sets at a level and unit; a KeyError names the levels there are."""
        for s in self.sets:
            if s.unit == unit and abs(s.level - level) < 1e-9:
                return s
        raise KeyError(f"no {unit} sets at {level:g} (levels: {sorted({s.level for s in self.sets})})")
