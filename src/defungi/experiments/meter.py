"""A job's plan before its work, and its progress during it.

A job (`run`, `study`, `train --cv`, `grid`, `curve`) first lists what it will fit: per step its
fits, their epochs (at most: early stopping ends fits sooner) and the training images they see, and
an estimate of the step's time from a short throughput probe of each model on this machine, in the
precision it trains in (`Probe`). `JobMeter` then draws one progress bar over the whole job, in
estimated seconds, whose time left scales the estimate by the speed measured so far; fits report
each epoch to it (`on_fit`). Each step's measured time is written beside its estimate in the job's
plan.json (summed over resumed runs) and reported.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from defungi.config import Config
from defungi.errors import DefungiError
from defungi.models.registry import create_model, model_entry
from defungi.results.plan import JobPlan, Rate, StepPlan, read_plan
from defungi.results.schema import to_dict
from defungi.stats.refusal import held_out_needed
from defungi.train.frozen import FrozenPass, frozen_pass
from defungi.train.loop import (
    Batch,
    Preprocess,
    autocast,
    build_optimizer,
    inference_precision,
    precision_name,
    train_one_epoch,
    train_step,
    weight_average,
)
from defungi.train.ood import Reading
from defungi.train.runtime import Threads, one_thread, resolve_device
from defungi.utils import atomic_write_json, clock, cpu_flags

log = logging.getLogger(__name__)

TTA_VIEWS = 8
SAVE_EVERY_S = 60.0  # plan.json's measured times are written this often during a step
LOG_EVERY_S = 120.0  # without a terminal, the job's progress is a log line this often


@dataclass
class FitPlan:
    """One model's fit as planned: its config and the images of each part of its split."""

    config: Config
    sizes: dict[str, int]  # 'train', 'val', and the parts scored at the end ('test', 'train_eval')
    cold_features: int = 0  # frozen backbone: cached readings of every image still to compute

    @classmethod
    def of(cls, config: Config, split: dict[str, np.ndarray]) -> FitPlan:
        return cls(config, {part: int(len(idx)) for part, idx in split.items()})

    @property
    def images(self) -> int:
        """Training images seen, at most (every epoch)."""
        return self.config.train.epochs * self.sizes.get("train", 0)


def rate_key(config: Config) -> str:
    """What a model's speed depends on: the model, its arguments, the image size, frozen or not."""
    tc = config.train
    changed = {k: v for k, v in tc.model_args.items() if model_entry(tc.model).defaults.get(k) != v}
    args = ",".join(f"{k}={v}" for k, v in sorted(changed.items()))
    frozen = ", head on frozen features" if tc.freeze_backbone else ""
    return f"{tc.model}{f' ({args})' if args else ''} {config.data.image_size} px{frozen}"


def _timed(fn: Callable[[], object], images: int, repeats: int, device: torch.device) -> float:
    """Images/s of fn (called once to warm up, then timed repeats times; on a GPU, to the end of its work)."""

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return repeats * images / (time.perf_counter() - start)


class Probe:
    """Each model's training and answering speed on this machine, measured once per `rate_key` (at the
    batch size of the first config that asks, at most 64) on random inputs, with the threads training
    would use, training in the precision it trains in and answering in the one answers use; a few
    seconds per model."""

    def __init__(self, classes: int = 5, repeats: int = 3) -> None:
        self.classes, self.repeats = classes, repeats
        self.rates: dict[str, Rate] = {}

    def rate(self, config: Config) -> Rate:
        key = rate_key(config)
        if key not in self.rates:
            log.info("probing the speed of %s", key)
            self.rates[key] = self._measure(config, key)
        return self.rates[key]

    def _measure(self, config: Config, key: str) -> Rate:
        tc, size = config.train, config.data.image_size
        device = resolve_device(tc.device)
        Threads(device).choose()
        if tc.freeze_backbone:
            return self._frozen(config, key, device)
        fmt = torch.channels_last if tc.channels_last else torch.contiguous_format
        model = create_model(tc.model, self.classes, **tc.model_args).to(device, memory_format=fmt)
        batch = min(tc.batch_size, 64)
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        with torch.no_grad(), autocast(device, inference_precision(device, tc.amp)):
            answer = _timed(lambda: model.eval()(x), batch, self.repeats, device)
        train = self._train_rate(config, model.train(), x, device)
        return Rate(key, precision_name(device, tc.amp), train, answer)

    def _frozen(self, config: Config, key: str, device: torch.device) -> Rate:
        """A frozen backbone's rates: its pass (train.frozen: the engine the fits will use, measured once
        per machine) and the part that trains, on the pass's own readings."""
        tc, size = config.train, config.data.image_size
        backbone = probed_pass(config, self.classes, device)
        start = backbone.readings.index(Reading(tc.train_from or model_entry(tc.model).parts.classifier, "input"))
        batch = min(tc.batch_size, 64)
        images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        read = torch.from_numpy(backbone.engine(images)[start]).to(device)
        inputs = read.repeat(-(-batch // 2), *[1] * (read.dim() - 1))[:batch]
        head = backbone.trained
        with torch.no_grad():
            head_answer = _timed(lambda: head.eval()(inputs), batch, self.repeats, device)
        train = self._train_rate(config, head.train(), inputs, device)
        return Rate(key, precision_name(device, tc.amp), train, head_answer, backbone.speed)

    def _train_rate(
        self, config: Config, trained: torch.nn.Module, inputs: torch.Tensor, device: torch.device
    ) -> float:
        """Images/s of the steps a fit takes (train.loop.train_step: its optimiser, schedule, loss,
        precision and weight average, in train_one_epoch) of trained on inputs."""
        tc = config.train
        y = torch.randint(0, self.classes, (len(inputs),), device=device)
        optimizer = build_optimizer(trained, tc.optimizer, tc.lr, tc.weight_decay)
        step = train_step(tc, trained, optimizer, self.repeats + 1, device, weight_average(trained, tc))
        batch = [Batch(inputs, y, y)]
        return _timed(lambda: train_one_epoch(trained, batch, 1, step, "probe"), len(inputs), self.repeats, device)


def probed_pass(config: Config, classes: int, device: torch.device) -> FrozenPass:
    """The pass of a frozen-backbone config that the probe times: the pretrained weights' normalisation,
    whatever the config's (the speed is the same)."""
    mean, std = model_entry(config.train.model).normalization
    preprocess = Preprocess(config.data.image_size, mean, std, config.data.normalize)
    return frozen_pass(config, classes, preprocess, device)


def export_ahead(config: Config) -> None:
    """A frozen-backbone config's probed pass exported for onnxruntime now (train.frozen), before its
    images load: seconds of one core while they decode in other processes (data.cache.decoding_ahead).
    The number of classes does not matter: the head is not in the graph."""
    if config.train.freeze_backbone:
        with one_thread():  # the other cores decode
            probed_pass(config, 2, resolve_device(config.train.device)).export()


def fit_seconds(fit: FitPlan, rate: Rate) -> tuple[float, float]:
    """Estimated seconds of one epoch, and of the rest of the fit (scoring, the refusal detector's
    readings, a frozen backbone's features when they are not cached yet)."""
    tc, sizes = fit.config.train, fit.sizes
    train, val = sizes.get("train", 0), sizes.get("val", 0)
    epoch = train / rate.train_images_per_s + val / rate.eval_images_per_s
    scored = sum(n for part, n in sizes.items() if part != "train")
    views = TTA_VIEWS if tc.tta else 1
    rest = scored * views / rate.eval_images_per_s
    if tc.ood and val >= held_out_needed():
        rest += sum(sizes.values()) / rate.eval_images_per_s  # one pass reads them all
    if fit.cold_features and rate.backbone_images_per_s:
        rest += fit.cold_features / rate.backbone_images_per_s
    return epoch, rest


def estimate(fits: Sequence[FitPlan], probe: Probe) -> float:
    """Estimated seconds of a list of fits, every epoch run."""
    total = 0.0
    for fit in fits:
        epoch, rest = fit_seconds(fit, probe.rate(fit.config))
        total += fit.config.train.epochs * epoch + rest
    return total


def step_plan(name: str, title: str, fits: Sequence[FitPlan], probe: Probe) -> StepPlan:
    """A step's line of the plan."""
    return StepPlan(
        name=name,
        title=title,
        fits=len(fits),
        epochs=sum(f.config.train.epochs for f in fits),
        images=sum(f.images for f in fits),
        estimate_seconds=estimate(fits, probe),
    )


def job_plan(steps: list[StepPlan], probe: Probe, previous: Path | None = None) -> JobPlan:
    """The job's plan; a step that an earlier run of the job finished keeps that run's estimate and
    measured time (previous: its plan.json), and so does the time already spent on an unfinished one."""
    plan = JobPlan(cpu=cpu_flags(), threads=torch.get_num_threads(), rates=list(probe.rates.values()), steps=steps)
    if previous is not None and previous.exists():
        try:
            before = {s.name: s for s in read_plan(previous).steps}
        except DefungiError as exc:
            log.warning("%s; its measured times are not carried over", exc)
            before = {}
        for step in steps:
            old = before.get(step.name)
            if old is not None and (step.done or old.seconds):
                step.seconds = old.seconds
                if step.done:
                    step.estimate_seconds, step.fits, step.epochs, step.images = (
                        old.estimate_seconds,
                        old.fits,
                        old.epochs,
                        old.images,
                    )
    return plan


def plan_lines(plan: JobPlan) -> list[str]:
    """The plan as printed before the work (and, with measured times, after it)."""
    width = max([len(s.title) for s in plan.steps] + [4])
    lines = [
        f"plan on this machine (CPU flags: {plan.cpu}; {plan.threads} threads), from the speed probed of each model:"
    ]
    lines += [
        f"  {r.model} ({r.precision}): trains {r.train_images_per_s:.0f} img/s, answers {r.eval_images_per_s:.0f} img/s"
        + (f", features {r.backbone_images_per_s:.0f} img/s" if r.backbone_images_per_s else "")
        for r in plan.rates
    ]
    lines.append(f"  {'step':<{width}}  {'fits':>4}  {'epochs':>6}  {'images':>9}  {'estimate':>8}  {'measured':>8}")
    for s in plan.steps:
        state = clock(s.seconds) if s.seconds is not None else ""
        lines.append(
            f"  {s.title:<{width}}  {s.fits:>4}  {s.epochs:>6}  {s.images:>9,}  {clock(s.estimate_seconds):>8}  "
            f"{state:>8}{'  (done)' if s.done else ''}"
        )
    lines.append(
        f"  {'whole job (at most: early stopping ends fits sooner)':<{width}}  {plan.fits:>4}  {plan.epochs:>6}  "
        f"{plan.images:>9,}  {clock(plan.estimate_seconds):>8}  {clock(plan.seconds):>8}"
    )
    return lines


class _Ticket:
    """One fit's reports to the meter: each epoch, each frozen backbone's pass over the images (the
    features it computes before its first epoch), and its end."""

    def __init__(self, meter: JobMeter | None, epoch_s: float, total_s: float, image_s: float = 0.0) -> None:
        self.meter, self.epoch_s, self.total_s, self.image_s, self.credited = meter, epoch_s, total_s, image_s, 0.0

    def epoch(self) -> None:
        self._credit(self.epoch_s)

    def features(self, images: int) -> None:
        """A pass of the frozen backbone over images: planned with the step (FitPlan.cold_features), not
        in the fit's own estimate."""
        if self.meter is not None:
            self.meter.advance(images * self.image_s)

    def done(self) -> None:
        self._credit(self.total_s - self.credited)

    def _credit(self, seconds: float) -> None:
        seconds = max(0.0, min(seconds, self.total_s - self.credited))
        self.credited += seconds
        if self.meter is not None:
            self.meter.advance(seconds)


class JobMeter:
    """One progress bar over a job in estimated seconds (a log line every few minutes without a
    terminal); the plan's measured times, written to plan.json as the job goes."""

    def __init__(self, plan: JobPlan, path: Path | None, probe: Probe) -> None:
        self.plan, self.path, self.probe = plan, path, probe
        self.total = sum(s.estimate_seconds for s in plan.steps if not s.done)
        self.done_s, self.step_done_s = 0.0, 0.0
        self.current: StepPlan | None = None
        self.started = self.step_started = self.saved = self.logged = time.monotonic()
        self.spent_before, self.fits_run = 0.0, 0
        self.bar = (
            tqdm(
                total=max(self.total, 1e-9),
                desc="whole job",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, about {remaining} left",
                dynamic_ncols=True,
            )
            if sys.stderr.isatty()
            else None
        )

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[StepPlan | None]:
        """Time the named step (its plan, None where the plan has no such step); when it ends, its
        planned share of the bar is complete."""
        step = next((s for s in self.plan.steps if s.name == name), None)
        if step is None or step.done:  # not planned, or finished before this run: read back, not timed
            yield step
            return
        self.current, self.step_started, self.step_done_s = step, time.monotonic(), 0.0
        self.spent_before, self.fits_run = step.seconds or 0.0, 0
        try:
            yield step
        except BaseException:
            step.seconds = self.spent_before + time.monotonic() - self.step_started
            raise
        else:
            step.seconds = self.spent_before + time.monotonic() - self.step_started
            step.done = True
            self.advance(step.estimate_seconds - self.step_done_s)
            if self.fits_run > step.fits:
                log.warning("%s fitted %d models, its plan listed %d", step.title, self.fits_run, step.fits)
        finally:
            self.current = None
            self.save()

    def advance(self, seconds: float) -> None:
        if self.current is not None:
            seconds = max(0.0, min(seconds, self.current.estimate_seconds - self.step_done_s))
            self.step_done_s += seconds
        self.done_s += seconds
        if self.bar is not None:
            self.bar.update(seconds)
        now = time.monotonic()
        if self.bar is None and now - self.logged >= LOG_EVERY_S:
            self.logged = now
            log.info("whole job: %s", self.status())
        if now - self.saved >= SAVE_EVERY_S:
            if self.current is not None:
                self.current.seconds = self.spent_before + now - self.step_started
            self.save()

    def status(self) -> str:
        """'41% of the planned work, 1:02:03 elapsed, about 1:30:00 left'."""
        elapsed = time.monotonic() - self.started
        share = min(1.0, self.done_s / self.total) if self.total else 1.0
        left = elapsed * (1 - share) / share if share > 0 else self.total
        return f"{100 * share:.0f}% of the planned work, {clock(elapsed)} elapsed, about {clock(left)} left"

    def save(self) -> None:
        self.saved = time.monotonic()
        if self.path is not None:
            atomic_write_json(self.path, to_dict(self.plan))

    def ticket(self, fit: FitPlan) -> _Ticket:
        self.fits_run += 1
        rate = self.probe.rate(fit.config)
        epoch, rest = fit_seconds(fit, rate)
        image_s = 1 / rate.backbone_images_per_s if rate.backbone_images_per_s else 0.0
        return _Ticket(self, epoch, fit.config.train.epochs * epoch + rest, image_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_METER: contextvars.ContextVar[JobMeter | None] = contextvars.ContextVar("job_meter", default=None)


@contextlib.contextmanager
def planned_job(
    steps: Callable[[Probe], list[StepPlan]], classes: int, path: Path | None = None
) -> Iterator[JobMeter | None]:
    """Plan a job (steps(probe): its steps' plans), print the plan, meter the work inside, then print
    each step's measured time beside its estimate; path: its plan.json (where an earlier run of the
    job left its measured times). Inside a job already planned (the main job), nothing: its plan
    covers this part."""
    if _METER.get() is not None:
        yield None
        return
    probe = Probe(classes)
    plan = job_plan(steps(probe), probe, path)
    for line in plan_lines(plan):
        log.info("%s", line)
    meter = JobMeter(plan, path, probe)
    meter.save()
    with metering(meter):
        yield meter
    for line in plan_lines(plan):
        log.info("%s", line)


@contextlib.contextmanager
def metering(meter: JobMeter) -> Iterator[JobMeter]:
    """Report the fits run inside to meter (log lines go above its bar)."""
    token = _METER.set(meter)
    try:
        with logging_redirect_tqdm() if meter.bar is not None else contextlib.nullcontext():
            yield meter
    finally:
        _METER.reset(token)
        meter.close()


def unmetered() -> None:
    """Report to no meter from now on: in a process forked to fit part of a job beside others, whose
    parent credits each fit to the job's meter when it ends."""
    _METER.set(None)


def current_step(name: str) -> contextlib.AbstractContextManager[StepPlan | None]:
    """The active meter's step, timed, with its plan (None without a meter)."""
    meter = _METER.get()
    return meter.step(name) if meter is not None else contextlib.nullcontext()


def on_fit(config: Config, split: dict[str, np.ndarray]) -> _Ticket:
    """A fit's ticket to the active meter (one that reports nowhere without one)."""
    meter = _METER.get()
    return meter.ticket(FitPlan.of(config, split)) if meter is not None else _Ticket(None, 0.0, 0.0)
