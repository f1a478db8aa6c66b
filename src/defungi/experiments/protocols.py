"""Fit a run folder by its protocol: one fit, an ensemble of seeds, or K-fold cross-validation.

`fit_run(config, out)` is the one way every part of defungi fits models (the train command,
curves, grids, studies): a finished run folder is read back, an interrupted one resumes. Each
protocol is an object that plans its fits (sub-run folders: members, folds) and combines their
results into one `RunMetrics`; `protocol_for(config)` picks it (which checkpoints make up the run's
model: `train.checkpoint.model_parts`). Figures are drawn afterwards from the folder's files.
"""

from __future__ import annotations

import functools
import logging
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from defungi.config import Config, load_config_from
from defungi.data.dataset import Dataset, load_dataset
from defungi.data.splits import cv_folds, train_val_test_split
from defungi.errors import DefungiError
from defungi.experiments import meter
from defungi.experiments.fit import FitResult, fit, score_parts
from defungi.experiments.meter import FitPlan
from defungi.experiments.rundir import FitRecord, RunDir, write_predictions
from defungi.layout import read_predictions, read_table
from defungi.models.registry import check_model
from defungi.results.ood import OodCheck
from defungi.results.run import (
    METRIC_NAMES,
    FoldScores,
    MemberScores,
    PartScores,
    Protocol,
    RunKind,
    RunMetrics,
    Spread,
    Timing,
)
from defungi.results.schema import from_dict
from defungi.results.trust import Trust
from defungi.stats.metrics import score_metrics, specimen_rule_text
from defungi.train import distributed
from defungi.train.assess import assess
from defungi.train.checkpoint import load_trained, model_args
from defungi.train.ood import ood_check
from defungi.train.runtime import Threads, resolve_device, single_threaded
from defungi.train.sources import cold_features, pretrained_pass
from defungi.utils import forked_map, no_progress_bars

log = logging.getLogger(__name__)

Split = dict[str, np.ndarray]


def dataset_for(config: Config, progress: bool = True) -> Dataset:
    """Load the images a config points at, at its image size, with its outlier threshold."""
    if not config.data.root:
        raise DefungiError("no data folder: pass --data DIR (or set DEFUNGI_DATA)")
    return load_dataset(config.data.root, config.data.image_size, config.data.variance_threshold, progress=progress)


def same_images(a: Config, b: Config) -> bool:
    """Whether dataset_for loads the same images for both configs: folder, image size, outlier threshold."""
    return all(getattr(a.data, k) == getattr(b.data, k) for k in ("root", "image_size", "variance_threshold"))


def split_for(config: Config, dataset: Dataset) -> Split:
    """The seeded train/val/test split a config asks for; a class too small for it is named."""
    dc = config.data
    parts = 3 if dc.test_fraction > 0 else 2
    for c, name in enumerate(dataset.classes):
        units = (
            len(set(dataset.specimens[dataset.labels == c]))
            if dc.split == "grouped"
            else int(np.sum(dataset.labels == c))
        )
        if units < parts:
            what = "samples" if dc.split == "grouped" else "images"
            raise DefungiError(
                f"class {name} has {units} {what}; a {dc.split} split into {parts} parts needs at least {parts} "
                f"(add {what} to it{' or use --split random' if dc.split == 'grouped' else ''})"
            )
    return train_val_test_split(dataset.labels, dataset.specimens, dc.val_fraction, dc.test_fraction, dc.split, dc.seed)


def cv_splits(config: Config, dataset: Dataset) -> list[Split]:
    """The config's K-fold cross-validation of data (see `defungi.data.splits.cv_folds`): its first
    data.cv_fit_folds folds (0: all)."""
    dc = config.data
    splits = cv_folds(
        dataset.labels, dataset.specimens, dataset.classes, dc.cv_folds, dc.val_fraction, dc.split, dc.seed
    )
    return splits[: dc.cv_fit_folds or None]


@dataclass
class FitProtocol(ABC):
    """How a run folder is fitted: which fits it plans, and how their results combine."""

    config: Config
    kind: ClassVar[RunKind]

    def list_fits(self, dataset: Dataset, split: Split | None) -> list[FitPlan]:
        """The fits execute would run (its leaves: folds, members), each with its parts' sizes."""
        return [FitPlan.of(self.config, split if split is not None else split_for(self.config, dataset))]

    @abstractmethod
    def execute(self, run: RunDir, dataset: Dataset, split: Split | None, sync: distributed.Sync) -> FitRecord:
        """Fit every planned part into run (finished ones read back) and write the run's result; sync:
        where the torchrun ranks of a single fit meet."""

    def metrics(self, dataset: Dataset, split: Split, precision: str, **record: Any) -> RunMetrics:
        """The run's metrics.json: what was trained and how, then record (scores, timing...)."""
        config = self.config
        protocol = Protocol(
            split=config.data.split,
            seed=config.data.seed,
            image_size=config.data.image_size,
            variance_threshold=config.data.variance_threshold,
            excluded=len(dataset.excluded),
            sizes={part: int(len(idx)) for part, idx in split.items()},
            groups={part: int(len(set(dataset.specimens[idx]))) for part, idx in split.items()},
            test_time_augmentation=config.train.tta,
            precision=precision,
            prior_weight=config.train.prior_weight if config.train.balance else 0.0,
            ensemble=config.train.ensemble,
            processes=distributed.world().size,
            cv_folds=config.data.cv_folds,
            cv_fit_folds=config.data.cv_fit_folds if config.data.cv_fit_folds < config.data.cv_folds else 0,
        )
        return RunMetrics(
            kind=self.kind,
            model=config.train.model,
            model_args=model_args(config),
            classes=list(dataset.classes),
            protocol=protocol,
            sample_rule=specimen_rule_text(config.train.specimen_rule),
            **record,
        )

    def start(self, run: RunDir, dataset: Dataset, splits: list[Split], recorded: Split) -> None:
        """Check that a batch fits every training part, claim the folder and record the data and its
        split (recorded: part -> images) before any training."""
        smallest = min(len(s["train"]) for s in splits)
        if smallest < self.config.train.batch_size:
            raise DefungiError(
                f"batch size {self.config.train.batch_size} is larger than the training part ({smallest} images); "
                f"use --batch-size {smallest} or less"
            )
        run.claim(self.config)
        run.check_split(dataset, recorded)
        run.write_exclusions(dataset)
        run.write_split(dataset, recorded)


def protocol_for(config: Config) -> FitProtocol:
    """The protocol a config asks for: K-fold cross-validation, an ensemble of seeds, or one fit."""
    if config.data.cv_folds >= 2:
        return CrossValidation(config)
    return SeedEnsemble(config) if config.train.ensemble > 1 else SingleFit(config)


def plan_fits(config: Config, dataset: Dataset, split: Split | None = None) -> list[FitPlan]:
    """The fits fit_run(config, ..., data, split) would run, each with its parts' sizes; the first
    carries the frozen backbone's readings that are not cached yet."""
    fits = protocol_for(config).list_fits(dataset, split)
    if fits:
        fits[0].cold_features = cold_features(config, dataset)
    return fits


def fit_run(
    config: Config, out: str | Path, dataset: Dataset | None = None, split: Split | None = None
) -> FitRecord | None:
    """Fit per config into the run folder out; returns its record.

    A finished run of the same config is read back (with a warning where its data folder changed
    since), an interrupted one resumes from its last epoch, another config in the folder is refused.
    data and split default to the config's.
    Under torchrun, rank 0 does all of this and the other ranks only train with it (None).
    """
    run = RunDir(out)
    rank = distributed.world()
    sync = distributed.Sync(rank)  # where the torchrun ranks of this run's fit meet
    if rank.launched:
        if rank.size > 1:
            _check_distributed(config, rank.size)
        distributed.setup(resolve_device(config.train.device))
        if not rank.main:
            return _follow(config, run, dataset, split, sync)
    preflight(config, run)
    with run.lock():
        if run.layout.config.exists():
            run.claim(config)  # refuses another config before any decoding
            if dataset is not None and split is not None:
                run.check_split(dataset, split)
            done = run.finished()
            if done is not None:
                log.info("%s is finished; delete it to train again", run.root)
                changed = run.data_changes(config.data.root) if dataset is None or split is None else ""
                if changed:  # read back, not refused: its results stand for the images it was trained on
                    log.warning(
                        "%s: the images in %s changed since it trained: %s; these results are from the old "
                        "data; train into a new --out to use the data as it is now",
                        run.root,
                        config.data.root,
                        changed,
                    )
                sync.start()  # no fit: the other torchrun ranks stop too
                return done
        dataset = dataset if dataset is not None else dataset_for(config)
        return protocol_for(config).execute(run, dataset, split, sync)


def preflight(config: Config, run: RunDir) -> None:
    """Refuse, before any decoding, what cannot train: an unusable --device, a model and arguments that
    cannot build, a missing --weights file (for a run not started), and the run folder prepared."""
    run.prepare()
    resolve_device(config.train.device)
    check_model(config.train.model, config.train.model_args)
    weights = Path(config.train.weights).expanduser() if config.train.weights else None
    if weights is not None and not weights.is_file() and not run.started():
        raise DefungiError(f"--weights {weights}: no such file")


def _check_distributed(config: Config, ranks: int) -> None:
    """What torchrun can train: one model, each global batch split evenly between the ranks."""
    tc = config.train
    if config.data.cv_folds >= 2 or tc.ensemble > 1 or tc.freeze_backbone:
        raise DefungiError(
            "torchrun trains one model end to end: drop --cv, train.ensemble and train.freeze_backbone, "
            "or run them in one process"
        )
    if tc.batch_size % ranks:
        raise DefungiError(f"batch size {tc.batch_size} does not split evenly over {ranks} processes")


def _follow(config: Config, run: RunDir, dataset: Dataset | None, split: Split | None, sync: distributed.Sync) -> None:
    """A rank > 0: hears at sync's start whether rank 0 fits (its last.pt comes with it: this rank's
    machine need not hold the run folder), then fits with it on the same data and split."""
    if sync.start().trains:
        dataset = dataset if dataset is not None else dataset_for(config, progress=False)
        fit(config, dataset, split if split is not None else split_for(config, dataset), run, sync)


def _parts(scores: dict[str, dict[str, Any]]) -> dict[str, PartScores]:
    """Scored parts (`score_parts`' dicts) as typed records."""
    return {part: from_dict(PartScores, s, part) for part, s in scores.items()}


def _split_trust(
    dataset: Dataset, split: Split, probs: dict[str, np.ndarray], seed: int, rule: str = "mean"
) -> Trust | None:
    """What answers of a one-split run can be trusted to: fitted on its validation part, checked on its
    test part (None without both)."""
    if "val" not in probs or "test" not in probs or not len(split["val"]) or not len(split["test"]):
        return None
    idx = np.concatenate([split["val"], split["test"]])
    fold = np.r_[np.full(len(split["val"]), -1), np.zeros(len(split["test"]), dtype=int)]
    both = np.concatenate([probs["val"], probs["test"]])
    return assess(
        both,
        dataset.labels[idx],
        dataset.specimens[idx],
        fold,
        dataset.classes,
        "validation + test",
        seed=seed,
        rule=rule,
    )


def _write_predictions(
    run: RunDir, dataset: Dataset, split: Split, probs: dict[str, np.ndarray], ood: dict[str, np.ndarray] | None = None
) -> None:
    """predictions_val.csv and predictions_test.csv (the parts a user looks into), with each image's
    out-of-distribution score where the fit has one."""
    for part in ("val", "test"):
        if part in probs:
            run.write_predictions(part, dataset, split[part], probs[part], (ood or {}).get(part))


class SingleFit(FitProtocol):
    """One model trained on the split's training part, early-stopped on its validation part."""

    kind: ClassVar[RunKind] = "fit"

    def execute(self, run: RunDir, dataset: Dataset, split: Split | None, sync: distributed.Sync) -> FitRecord:
        split = split if split is not None else split_for(self.config, dataset)
        self.start(run, dataset, [split], split)
        log.info("split (%s): %s", self.config.data.split, {k: len(v) for k, v in split.items()})
        result = fit(self.config, dataset, split, run, sync)  # its start tells the other torchrun ranks to fit too
        _write_predictions(run, dataset, split, result.probabilities, result.ood_scores)
        ood = _store_ood(run, result, dataset, split, self.config.train.seed)
        metrics = self.metrics(
            dataset,
            split,
            result.precision,
            parameters=result.parameters,
            timing=_timing(result),
            best_epochs=[result.best_epoch],
            stop_reason=result.stop_reason,
            parts=_parts(result.metrics),
            trust=_split_trust(
                dataset, split, result.probabilities, self.config.train.seed, self.config.train.specimen_rule
            ),
            ood=ood,
        )
        return run.write_result(result.history, metrics)


def _store_ood(run: RunDir, result: FitResult, dataset: Dataset, split: Split, seed: int) -> OodCheck | None:
    """Store the fit's refusal of non-micrographs; how it did on the test part's micrographs (None
    without a detector or a test part)."""
    if result.ood is None:
        return None
    run.save_ood(result.ood)
    if "test" not in result.ood_scores:
        return None
    detector, specimens = result.ood, dataset.specimens[split["test"]]
    return ood_check("test", detector.quantile, [detector.threshold], result.ood_scores["test"], specimens, seed)


def _timing(result: FitResult) -> Timing:
    """Training time, epochs and speed of one fit, and the seconds each part took to score."""
    images_seen = sum(h.seconds * h.images_per_s for h in result.history)
    return Timing(
        train_seconds=result.train_seconds,
        epochs_run=len(result.history),
        train_images_per_s=images_seen / result.train_seconds if result.train_seconds else None,
        eval_seconds={part: m["seconds"] for part, m in result.metrics.items()},
    )


def _summed_timing(records: list[FitRecord], eval_seconds: dict[str, float] | None = None) -> Timing:
    """The timing of several fits (folds, members) together: their sums and mean speed."""
    timings = [r.metrics.timing for r in records]
    speeds = [t.train_images_per_s for t in timings if t.train_images_per_s]
    return Timing(
        train_seconds=sum(t.train_seconds for t in timings),
        epochs_run=sum(t.epochs_run for t in timings),
        train_images_per_s=float(np.mean(speeds)) if speeds else None,
        eval_seconds=eval_seconds or {},
    )


class SeedEnsemble(FitProtocol):
    """train.ensemble fits that differ only in seed, each a run folder of its own (member-K), scored
    together by the mean of their probabilities."""

    kind: ClassVar[RunKind] = "ensemble"

    def member_configs(self) -> list[Config]:
        tc = self.config.train
        return [
            load_config_from(self.config, {"train.ensemble": 1, "train.seed": tc.seed + k}) for k in range(tc.ensemble)
        ]

    def list_fits(self, dataset: Dataset, split: Split | None) -> list[FitPlan]:
        split = split if split is not None else split_for(self.config, dataset)
        return [FitPlan.of(member, split) for member in self.member_configs()]

    def execute(self, run: RunDir, dataset: Dataset, split: Split | None, sync: distributed.Sync) -> FitRecord:
        split = split if split is not None else split_for(self.config, dataset)
        self.start(run, dataset, [split], split)
        members = []
        for k, member in enumerate(self.member_configs()):
            log.info("ensemble member %d/%d (seed %d)", k + 1, self.config.train.ensemble, member.train.seed)
            members.append(fit_run(member, run.member(k).root, dataset, split))
        trained = load_trained(run.root)
        tc = self.config.train
        scores, probs = score_parts(
            trained.model, dataset, split, trained.preprocess, trained.device, tc, trained.class_weights()
        )
        _write_predictions(run, dataset, split, probs)
        metrics = self.metrics(
            dataset,
            split,
            members[0].metrics.protocol.precision,
            parameters=sum(m.metrics.parameters for m in members),
            timing=_summed_timing(members, {part: s["seconds"] for part, s in scores.items()}),
            best_epochs=[e for m in members for e in m.metrics.best_epochs],
            stop_reason="; ".join(
                f"seed {c.train.seed}: {m.metrics.stop_reason}"
                for c, m in zip(self.member_configs(), members, strict=True)
            ),
            parts=_parts(scores),
            trust=_split_trust(dataset, split, probs, tc.seed, tc.specimen_rule),
            members=[
                MemberScores(
                    seed=c.train.seed,
                    run=str(m.path),
                    parts={
                        p: {k: getattr(s, k) for k in METRIC_NAMES} for p, s in m.metrics.parts.items() if p in scores
                    },
                )
                for c, m in zip(self.member_configs(), members, strict=True)
            ],
        )
        return run.write_result([], metrics)


class CrossValidation(FitProtocol):
    """K folds, each a run folder (fold-K, itself one fit or an ensemble); every usable image scored
    once by the model that never saw its specimen (oof.csv); metrics over all of them with intervals,
    and per fold."""

    kind: ClassVar[RunKind] = "cv"

    @property
    def fold_config(self) -> Config:
        return load_config_from(self.config, {"data.cv_folds": 0, "data.cv_fit_folds": 0})

    def list_fits(self, dataset: Dataset, split: Split | None) -> list[FitPlan]:
        inner = protocol_for(self.fold_config)
        return [fit for fold in cv_splits(self.config, dataset) for fit in inner.list_fits(dataset, fold)]

    def execute(self, run: RunDir, dataset: Dataset, split: Split | None, sync: distributed.Sync) -> FitRecord:
        splits = cv_splits(self.config, dataset)
        folds = {f"fold-{k}": s["test"] for k, s in enumerate(splits)}
        self.start(run, dataset, splits, folds)
        workers = fold_processes(self.fold_config, len(splits))
        if workers > 1:
            records = _forked_folds(self.fold_config, run, dataset, splits, workers)
        else:
            records = [_fit_fold(self.fold_config, run, dataset, splits, k) for k in range(len(splits))]
        idx, fold_of, probs, ood = _out_of_fold(run, dataset, splits)
        extra = {"fold": fold_of.tolist()} | ({"ood": [f"{x:.4f}" for x in ood]} if ood is not None else {})
        write_predictions(run.layout.oof, dataset, idx, probs, extra=extra)
        seed, rule = self.config.train.seed, self.config.train.specimen_rule
        oof = score_metrics(probs, dataset.labels[idx], dataset.specimens[idx], dataset.classes, seed, rule)
        per_fold = [_fold_scores(k, r.metrics.part("test")) for k, r in enumerate(records)]
        metrics = self.metrics(
            dataset,
            folds,
            records[0].metrics.protocol.precision,
            parameters=records[0].metrics.parameters,
            timing=_summed_timing(records),
            best_epochs=[e for r in records for e in r.metrics.best_epochs],
            stop_reason="; ".join(f"fold {k}: {r.metrics.stop_reason}" for k, r in enumerate(records, 1)),
            parts={"test": from_dict(PartScores, oof, "out of fold")},
            # what answers can be trusted to is fitted on some folds and checked on another: 2 folds at least
            trust=assess(
                probs,
                dataset.labels[idx],
                dataset.specimens[idx],
                fold_of,
                dataset.classes,
                "out of fold",
                seed=seed,
                rule=rule,
            )
            if len(splits) >= 2
            else None,
            ood=_cv_ood_check(records, ood, dataset.specimens[idx], seed),
            folds=per_fold,
            fold_spread={
                key: _spread([getattr(f, key) for f in per_fold])
                for key in ("accuracy", "f1", "sample_accuracy", "sample_f1")
            }
            if len(splits) >= 2
            else {},
        )
        return run.write_result([], metrics)


def _fit_fold(config: Config, run: RunDir, dataset: Dataset, splits: list[Split], k: int) -> FitRecord:
    """Fold k of a cross-validation, fitted into its folder (fold-k)."""
    log.info("cross-validation fold %d/%d: %s", k + 1, len(splits), {p: len(v) for p, v in splits[k].items()})
    record = fit_run(config, run.fold(k).root, dataset, splits[k])
    assert record is not None  # torchrun fits no cross-validation (_check_distributed)
    return record


def fold_processes(config: Config, folds: int) -> int:
    """How many folds of a cross-validation fit at once, each in a process of one thread forked after
    the frozen backbone's one pass over every image: heads on cached features gain nothing from a
    second thread (their steps are too small), so each core fits a fold. As many as the threads
    torch would compute with (train.runtime.Threads: DEFUNGI_THREADS=1 fits them one after the other);
    1 (in this process) unless the fits are heads on a frozen backbone whose preprocessing no fold's
    training part changes, on a CPU, one fit per fold, outside torchrun, on Linux (fork)."""
    tc = config.train
    device = resolve_device(tc.device)
    if not (tc.freeze_backbone and config.data.normalize != "dataset" and tc.ensemble == 1):
        return 1
    if device.type != "cpu" or distributed.world().launched or not sys.platform.startswith("linux"):
        return 1
    threads = Threads(device)
    return max(1, min(folds, threads.fixed or len(threads.cpus)))


def _forked_folds(config: Config, run: RunDir, dataset: Dataset, splits: list[Split], workers: int) -> list[FitRecord]:
    """The folds fitted in processes forked from this one, workers at a time, after the frozen
    backbone's pass over every image here (on the faster engine: the folds read its cache and pass
    nothing; each fits on one thread, so that its answers do not depend on how many ran at once).
    Folds finished earlier are read back here; the job's meter is told of each other one as it ends."""
    todo = [k for k in range(len(splits)) if run.fold(k).finished() is None]
    records = {}
    if todo:
        tickets = [meter.on_fit(config, splits[k]) for k in todo]
        for view in range(config.train.cached_views):
            pretrained_pass(config, dataset, view).cached(dataset.images, dataset.keys, view, tickets[0].features)
        log.info("cross-validation: %d folds to fit, %d at once (a process of one thread each)", len(todo), workers)
        forked = forked_map(functools.partial(_forked_fold, config, run, dataset, splits, todo), len(todo), workers)
        for k, ticket, record in zip(todo, tickets, forked, strict=True):
            records[k] = record
            ticket.done()
    return [records[k] if k in records else _fit_fold(config, run, dataset, splits, k) for k in range(len(splits))]


def _forked_fold(
    config: Config, run: RunDir, dataset: Dataset, splits: list[Split], todo: list[int], i: int
) -> FitRecord:
    """Fold todo[i], fitted in a forked process: on one thread (no OpenMP pool after a fork), with no
    bar nor meter (the parent's covers the job), its log lines written straight to stderr (not through a
    bar's lock, which another thread of the parent may have held at the fork) and tagged with the fold."""
    k = todo[i]
    single_threaded()
    no_progress_bars()
    meter.unmetered()
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(root.handlers[0].formatter if root.handlers else None)

    def tag(record: logging.LogRecord) -> bool:
        record.msg = f"[fold {k + 1}] {record.msg}"
        return True

    handler.addFilter(tag)
    root.handlers = [handler]
    return _fit_fold(config, run, dataset, splits, k)


def _out_of_fold(
    run: RunDir, dataset: Dataset, splits: list[Split]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Every fold's test images, their fold, the probabilities its model gave them and their
    out-of-distribution scores (None unless every fold scored them), by image."""
    idx = np.concatenate([s["test"] for s in splits])
    fold_of = np.concatenate([[k] * len(s["test"]) for k, s in enumerate(splits)])
    probs = np.concatenate([_fold_probabilities(run, k, dataset, s["test"]) for k, s in enumerate(splits)])
    scores = [_fold_ood(run, k) for k in range(len(splits))]
    ood = np.concatenate(scores) if all(s is not None for s in scores) else None
    order = np.argsort(idx)
    return idx[order], fold_of[order], probs[order], ood[order] if ood is not None else None


def _fold_ood(run: RunDir, k: int) -> np.ndarray | None:
    """Fold k's out-of-distribution score of each test image (None where its predictions have none)."""
    rows = read_table(run.fold(k).layout.predictions("test"))
    return np.array([float(r["ood"]) for r in rows]) if rows and "ood" in rows[0] else None


def _cv_ood_check(
    records: list[FitRecord], ood: np.ndarray | None, specimens: np.ndarray, seed: int
) -> OodCheck | None:
    """The out-of-fold refusal of micrographs (None unless every fold has a detector)."""
    checks = [r.metrics.ood for r in records]
    if ood is None or any(c is None for c in checks):
        return None
    thresholds = [t for c in checks for t in c.thresholds]
    return ood_check("out of fold", checks[0].quantile, thresholds, ood, specimens, seed)


def _fold_probabilities(run: RunDir, k: int, dataset: Dataset, idx: np.ndarray) -> np.ndarray:
    """Fold k's test probabilities, checked to be those of the images it is now given."""
    paths, probs = read_predictions(run.fold(k).layout.predictions("test"), dataset.classes)
    if paths != [str(dataset.paths[i]) for i in idx]:
        raise DefungiError(
            f"{run.fold(k).root}: its test images are not this fold's any more (the data changed); use a new --out"
        )
    return probs


def _fold_scores(k: int, test: PartScores) -> FoldScores:
    samples = test.samples
    assert samples is not None  # every scored part has its per-specimen scores
    return FoldScores(
        fold=k,
        test_images=test.n,
        test_samples=samples.n,
        accuracy=test.accuracy,
        precision=test.precision,
        recall=test.recall,
        f1=test.f1,
        sample_accuracy=samples.accuracy,
        sample_f1=samples.f1,
    )


def _spread(values: list[float]) -> Spread:
    return Spread(float(np.mean(values)), float(np.std(values)), float(np.min(values)), float(np.max(values)))
