"""Train into a run folder, and score a trained run on another folder.

`train` is the one way every part of defungi fits a model (the train command, curves, grids,
studies): a finished run folder is read back, an interrupted one resumes, an ensemble trains
its members. Figures are drawn afterwards from the folder's files (`defungi.report.run`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from defungi.config import Config, load_config_from
from defungi.data.dataset import Dataset, load_dataset
from defungi.data.splits import cv_folds, train_val_test_split
from defungi.errors import DefungiError
from defungi.experiments.fit import FitResult, fit, score_parts
from defungi.experiments.rundir import FitRecord, RunDir, load_trained, model_args, write_predictions
from defungi.layout import EvaluationLayout, RunLayout, read_json, read_predictions
from defungi.train import distributed
from defungi.train.loop import evaluate, predict_proba
from defungi.train.metrics import calibrated, scored
from defungi.train.runtime import resolve_device
from defungi.utils import atomic_write_json

log = logging.getLogger(__name__)


def dataset_for(config: Config, progress: bool = True) -> Dataset:
    """Load the images a config points at, at its image size, with its outlier threshold."""
    if not config.data.root:
        raise DefungiError("no data folder: pass --data DIR (or set DEFUNGI_DATA)")
    return load_dataset(config.data.root, config.data.image_size, config.data.variance_threshold, progress=progress)


def split_for(config: Config, data: Dataset) -> dict[str, np.ndarray]:
    """The seeded train/val/test split a config asks for; a class too small for it is named."""
    dc = config.data
    parts = 3 if dc.test_fraction > 0 else 2
    for c, name in enumerate(data.classes):
        units = len(set(data.groups[data.labels == c])) if dc.split == "grouped" else int(np.sum(data.labels == c))
        if units < parts:
            what = "samples" if dc.split == "grouped" else "images"
            raise DefungiError(
                f"class {name} has {units} {what}; a {dc.split} split into {parts} parts needs at least {parts} "
                f"(add {what} to it{' or use --split random' if dc.split == 'grouped' else ''})"
            )
    return train_val_test_split(data.labels, data.groups, dc.val_fraction, dc.test_fraction, dc.split, dc.seed)


def train(
    config: Config, out: str | Path, data: Dataset | None = None, split: dict[str, np.ndarray] | None = None
) -> FitRecord | None:
    """Train per config into the run folder out; returns its record.

    A finished run of the same config is read back, an interrupted one resumes from its last
    epoch, another config in the folder is refused. data and split default to the config's.
    Under torchrun, rank 0 does all of this and the other ranks only train with it (None).
    """
    run = RunDir(out)
    rank = distributed.world()
    if rank.launched:
        if rank.size > 1:
            _check_distributed(config, rank.size)
        distributed.setup(resolve_device(config.train.device))
        if not rank.main:
            return _follow(config, run, data, split)
    run.prepare()
    resolve_device(config.train.device)  # an unusable --device is refused before any decoding
    weights = Path(config.train.weights).expanduser() if config.train.weights else None
    if weights is not None and not weights.is_file() and not run.started():
        raise DefungiError(f"--weights {weights}: no such file")
    with run.lock():
        if run.layout.config.exists():
            run.claim(config)  # refuses another config before any decoding
            if data is not None and split is not None:
                run.check_split(data, split)
            done = run.finished()
            if done is not None:
                log.info("%s is finished; delete it to train again", run.root)
                distributed.from_main(True)  # the other torchrun ranks stop too
                return done
        data = data if data is not None else dataset_for(config)
        if config.data.cv_folds >= 2:
            return _train_cv(config, data, run)
        split = split if split is not None else split_for(config, data)
        _check_batch_size(config, [split])
        run.claim(config)
        run.check_split(data, split)
        run.write_exclusions(data)
        run.write_split(data, split)
        log.info("split (%s): %s", config.data.split, {k: len(v) for k, v in split.items()})
        if config.train.ensemble > 1:
            return _train_ensemble(config, data, split, run)
        distributed.from_main(False)  # the other torchrun ranks train with this one
        result = fit(config, data, split, run)
        _write_predictions(run, data, split, result.probabilities)
        record = _fit_record(result) | _temperature(data, split, result.probabilities)
        return run.write_result(
            result.history, _metrics(config, data, split, result.metrics, result.precision, **record)
        )


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


def _follow(config: Config, run: RunDir, data: Dataset | None, split: dict[str, np.ndarray] | None) -> None:
    """A rank > 0: the same data, split and steps as rank 0, which says whether the run is finished
    and sends its last.pt to resume from (this rank's machine need not hold the run folder)."""
    if distributed.from_main(None):
        return None
    data = data if data is not None else dataset_for(config, progress=False)
    fit(config, data, split if split is not None else split_for(config, data), run)
    return None


def _check_batch_size(config: Config, splits: list[dict[str, np.ndarray]]) -> None:
    """A batch must fit in every training part (else an epoch would train on nothing)."""
    smallest = min(len(s["train"]) for s in splits)
    if smallest < config.train.batch_size:
        raise DefungiError(
            f"batch size {config.train.batch_size} is larger than the training part ({smallest} images); "
            f"use --batch-size {smallest} or less"
        )


def _temperature(data: Dataset, split: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> dict[str, Any]:
    """{'temperature': ...} fitted on the validation part and checked on the test part (see
    `defungi.train.metrics.calibrated`), when the run scored both."""
    if len(probs.get("val", [])) == 0 or len(probs.get("test", [])) == 0:
        return {}
    labels = data.labels
    return {"temperature": calibrated(probs["val"], labels[split["val"]], probs["test"], labels[split["test"]])}


def _write_predictions(run: RunDir, data: Dataset, split: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> None:
    """predictions_val.csv and predictions_test.csv (the parts a user looks into)."""
    for part in ("val", "test"):
        if part in probs:
            run.write_predictions(part, data, split[part], probs[part])


def cv_splits(config: Config, data: Dataset) -> list[dict[str, np.ndarray]]:
    """The config's K-fold cross-validation of data (see `defungi.data.splits.cv_folds`)."""
    dc = config.data
    return cv_folds(data.labels, data.groups, data.classes, dc.cv_folds, dc.val_fraction, dc.split, dc.seed)


def _oof_probabilities(run: RunDir, k: int, data: Dataset, idx: np.ndarray) -> np.ndarray:
    """Fold k's test probabilities, checked to be those of the images it is now given."""
    paths, probs = read_predictions(run.fold(k).layout.predictions("test"), data.classes)
    if paths != [str(data.paths[i]) for i in idx]:
        raise DefungiError(
            f"{run.fold(k).root}: its test images are not this fold's any more (the data changed); use a new --out"
        )
    return probs


def _train_cv(config: Config, data: Dataset, run: RunDir) -> FitRecord:
    """K folds, each a run folder (finished ones read back); every usable image scored once by the
    model that never saw its sample (oof.csv); metrics over all of them with intervals, per fold."""
    splits = cv_splits(config, data)
    _check_batch_size(config, splits)
    folds = {f"fold-{k}": s["test"] for k, s in enumerate(splits)}
    run.claim(config)
    run.check_split(data, folds)
    run.write_exclusions(data)
    run.write_split(data, folds)
    fold_config = load_config_from(config, {"data.cv_folds": 0})
    records = []
    for k, split in enumerate(splits):
        log.info("cross-validation fold %d/%d: %s", k + 1, len(splits), {p: len(v) for p, v in split.items()})
        records.append(train(fold_config, run.fold(k).root, data, split))
    idx = np.concatenate([s["test"] for s in splits])
    fold_of = np.concatenate([[k] * len(s["test"]) for k, s in enumerate(splits)])
    probs = np.concatenate([_oof_probabilities(run, k, data, s["test"]) for k, s in enumerate(splits)])
    order = np.argsort(idx)
    idx, fold_of, probs = idx[order], fold_of[order], probs[order]
    write_predictions(run.layout.oof, data, idx, probs, extra={"fold": fold_of.tolist()})
    oof = scored(probs, data.labels[idx], data.groups[idx], data.classes, seed=config.train.seed)
    val_idx = np.concatenate([s["val"] for s in splits])
    val_probs = np.concatenate(
        [read_predictions(run.fold(k).layout.predictions("val"), data.classes)[1] for k in range(len(splits))]
    )  # each fold's validation part, scored by its own model
    per_fold = [
        {"fold": k, "test_images": r.metrics["test"]["n"], "test_samples": r.metrics["test"]["samples"]["n"]}
        | {key: r.metrics["test"][key] for key in ("accuracy", "precision", "recall", "f1")}
        | {f"sample_{key}": r.metrics["test"]["samples"][key] for key in ("accuracy", "f1")}
        for k, r in enumerate(records)
    ]
    spread = {
        key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v))}
        for key in ("accuracy", "f1", "sample_accuracy", "sample_f1")
        for v in [[f[key] for f in per_fold]]
    }
    timing = {"train_seconds": sum(r.metrics["timing"]["train_seconds"] for r in records)}
    metrics = _metrics(
        config, data, folds, {"test": oof}, records[0].metrics["protocol"]["precision"],
        parameters=records[0].metrics["parameters"], timing=timing, folds=per_fold, fold_spread=spread,
        **_temperature(data, {"val": val_idx, "test": idx}, {"val": val_probs, "test": probs}),
        sample_rule="a sample's decision: the mean of its images' class probabilities, then the most probable class",
    )  # fmt: skip
    return run.write_result([], metrics)


def _fit_record(result: FitResult) -> dict[str, Any]:
    """Parameters, timing and stopping of one fit, as metrics.json records them."""
    images_seen = sum(h["seconds"] * h["images_per_s"] for h in result.history)
    timing = {
        "train_seconds": result.train_seconds,
        "epochs_run": len(result.history),
        "train_images_per_s": images_seen / result.train_seconds if result.train_seconds else None,
        "eval_seconds": {part: m["seconds"] for part, m in result.metrics.items()},
    }
    return {
        "parameters": result.parameters,
        "timing": timing,
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
    }


def _metrics(
    config: Config,
    data: Dataset,
    split: dict[str, np.ndarray],
    scores: dict[str, dict[str, Any]],
    precision: str,
    **record: Any,
) -> dict[str, Any]:
    """metrics.json: model, protocol, record (parameters, timing...), then the scored parts."""
    protocol = {
        "split": config.data.split,
        "seed": config.data.seed,
        "image_size": config.data.image_size,
        "variance_threshold": config.data.variance_threshold,
        "excluded": len(data.excluded),
        "sizes": {part: int(len(idx)) for part, idx in split.items()},
        "groups": {part: int(len(set(data.groups[idx]))) for part, idx in split.items()},
        "test_time_augmentation": config.train.tta,
        "precision": precision,
        "prior_weight": config.train.prior_weight if config.train.balance else 0.0,
        "ensemble": config.train.ensemble,
        "processes": distributed.world().size,  # torchrun ranks that trained it (one global batch between them)
        "cv_folds": config.data.cv_folds,
        "metric_average": "macro over classes",
    }
    return {
        "model": config.train.model,
        "model_args": model_args(config),
        "classes": data.classes,
        "protocol": protocol,
        **record,
        **scores,
    }


def _train_ensemble(config: Config, data: Dataset, split: dict[str, np.ndarray], run: RunDir) -> FitRecord:
    """train.ensemble fits that differ only in seed, each a run folder of its own (finished ones are
    read back), scored together by the mean of their probabilities."""
    tc = config.train
    members = []
    for k in range(tc.ensemble):
        log.info("ensemble member %d/%d (seed %d)", k + 1, tc.ensemble, tc.seed + k)
        member = load_config_from(config, {"train.ensemble": 1, "train.seed": tc.seed + k})
        members.append(train(member, run.member(k).root, data, split))
    trained = load_trained(run.root)
    scores, probs = score_parts(
        trained.model, data, split, trained.preprocess, trained.device, tc, trained.class_weights()
    )
    _write_predictions(run, data, split, probs)
    timings = [m.metrics["timing"] for m in members]
    speeds = [t["train_images_per_s"] for t in timings if t["train_images_per_s"]]
    timing = {
        "train_seconds": sum(t["train_seconds"] for t in timings),
        "epochs_run": sum(t["epochs_run"] for t in timings),
        "train_images_per_s": float(np.mean(speeds)) if speeds else None,
        "eval_seconds": {part: m["seconds"] for part, m in scores.items()},
    }
    metrics = _metrics(
        config,
        data,
        split,
        scores,
        members[0].metrics["protocol"]["precision"],
        parameters=sum(m.metrics["parameters"] for m in members),
        timing=timing,
        best_epoch=[m.metrics["best_epoch"] for m in members],
        **_temperature(data, split, probs),
        stop_reason="; ".join(f"seed {tc.seed + k}: {m.metrics['stop_reason']}" for k, m in enumerate(members)),
        members=[
            {"seed": tc.seed + k, "run": str(m.path)}
            | {
                part: {key: m.metrics[part][key] for key in ("accuracy", "precision", "recall", "f1")}
                for part in scores
            }
            for k, m in enumerate(members)
        ],
    )
    return run.write_result([], metrics)


def evaluate_run(
    run_dir: str | Path,
    data_root: str | Path,
    out_dir: str | Path | None = None,
    tta: bool | None = None,
    prior_weight: float | None = None,
) -> dict[str, Any]:
    """Score a trained run on any labelled folder; metrics.json in out_dir (default: RUN/evaluations/NAME,
    NAME-<hash> when another folder of that name was evaluated there before)."""
    out = EvaluationLayout(Path(out_dir)) if out_dir else _evaluation_layout(Path(run_dir), Path(data_root))
    RunDir(out.root).prepare()
    trained = load_trained(run_dir)
    data = load_dataset(
        data_root, trained.preprocess.image_size, trained.config.data.variance_threshold, classes=trained.classes
    )
    use_tta = trained.config.train.tta if tta is None else tta
    power = trained.config.train.prior_weight if prior_weight is None else prior_weight
    weights = trained.class_weights(power)
    probs, loss = evaluate(
        trained.model,
        data.images,
        data.labels,
        trained.preprocess,
        trained.device,
        tta=use_tta,
        amp=trained.config.train.amp,
        class_weights=weights,
    )
    metrics = scored(probs, data.labels, data.groups, trained.classes, seed=trained.config.train.seed) | {
        "loss": loss,
        "data": str(Path(data_root).resolve()),
        "run": str(run_dir),
        "model": trained.info["model_name"],
        "tta": use_tta,
        "prior_weight": power if weights is not None else 0.0,
        "excluded": data.excluded,
    }
    atomic_write_json(out.metrics, metrics)
    return metrics | {"out_dir": str(out.root)}


def _evaluation_layout(run_dir: Path, data_root: Path) -> EvaluationLayout:
    """RUN/evaluations/NAME for a data folder called NAME, unless another folder of that name was
    evaluated there: then NAME-<hash of its path>."""
    name = data_root.resolve().name
    out = RunLayout(run_dir).evaluation(name)
    if out.metrics.exists() and Path(read_json(out.metrics)["data"]).resolve() != data_root.resolve():
        digest = hashlib.sha1(str(data_root.resolve()).encode()).hexdigest()[:6]
        out = RunLayout(run_dir).evaluation(f"{name}-{digest}")
    return out


def inference_images_per_s(run_dir: str | Path, n_images: int = 256, batch_size: int = 64) -> float:
    """Images/s of a run's model predicting (no test-time augmentation, in the precision predict uses)
    on synthetic inputs of its size."""
    trained = load_trained(run_dir)
    size = trained.preprocess.image_size
    images = np.random.default_rng(0).integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)
    amp = trained.config.train.amp
    predict_proba(
        trained.model, images[:batch_size], trained.preprocess, trained.device, batch_size, amp=amp
    )  # warm-up
    start = time.perf_counter()
    predict_proba(trained.model, images, trained.preprocess, trained.device, batch_size, amp=amp)
    return n_images / (time.perf_counter() - start)
