"""What a job's plan.json holds, as typed records: the steps it fits, each step's estimate from a
short throughput probe on the machine that ran it, and each step's measured time beside it.

Written by `defungi.experiments.meter` before and during the work (`run`, `study`), read by
`defungi.report`. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from defungi.results.schema import SCHEMA_VERSION, read_record


@dataclass
class Rate:
    """A model's measured speed on this machine, in the precision it trains in: images/s training
    (forward, backward and step; with a frozen backbone the head alone) and answering."""

    model: str  # model, its arguments and image size, e.g. 'resnet34 64 px'
    precision: str
    train_images_per_s: float
    eval_images_per_s: float
    backbone_images_per_s: float | None = None  # a frozen backbone computing its cached features


@dataclass
class StepPlan:
    """One step of a job: what it fits (at most: early stopping ends fits sooner) and its estimated
    and measured time. A step finished before this run started was read back (done)."""

    name: str  # e.g. 'resnet34/grid20' or 'transfer'
    title: str
    fits: int
    epochs: int
    images: int  # training images seen (epochs x training part, summed over fits)
    estimate_seconds: float
    done: bool = False
    seconds: float | None = None  # measured: wall time spent on the step, summed over resumed runs


@dataclass
class JobPlan:
    """plan.json of a job folder: the machine, the probe's rates and the steps in the order they run."""

    cpu: str  # the CPU's AVX-512 / AMX flags
    threads: int
    rates: list[Rate]
    steps: list[StepPlan] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def fits(self) -> int:
        return sum(s.fits for s in self.steps)

    @property
    def epochs(self) -> int:
        return sum(s.epochs for s in self.steps)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.steps)

    @property
    def estimate_seconds(self) -> float:
        return sum(s.estimate_seconds for s in self.steps)

    @property
    def seconds(self) -> float | None:
        """The whole job's measured time (None until every step has one)."""
        times = [s.seconds for s in self.steps]
        return None if any(t is None for t in times) else sum(t for t in times if t is not None)


def read_plan(path: Path) -> JobPlan:
    """A job's plan.json, or one line naming the file and what is wrong."""
    return read_record(JobPlan, path)
