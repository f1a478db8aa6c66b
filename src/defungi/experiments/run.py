"""A run folder: config in, trained model, metrics, history and figures out; resumable."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from defungi.config import Config, config_from_dict, load_config_from, same_config
from defungi.data.dataset import Dataset, load_dataset
from defungi.data.splits import train_val_test_split
from defungi.errors import DefungiError
from defungi.experiments.fit import FitResult, fit, model_args, score_parts
from defungi.report.plots import contact_sheet, plot_confusion, plot_epoch_curves, plot_history
from defungi.train.checkpoint import load_trained
from defungi.train.loop import evaluate
from defungi.train.metrics import classification_metrics
from defungi.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def dataset_for(config: Config, progress: bool = True) -> Dataset:
    """Load the images a config points at, at its image size, with its outlier threshold."""
    if not config.data.root:
        raise DefungiError("no data folder: pass --data DIR (or set DEFUNGI_DATA)")
    return load_dataset(config.data.root, config.data.image_size, config.data.variance_threshold, progress=progress)


def split_for(config: Config, data: Dataset) -> dict[str, np.ndarray]:
    """The seeded train/val/test split a config asks for."""
    dc = config.data
    return train_val_test_split(data.labels, data.groups, dc.val_fraction, dc.test_fraction, dc.split, dc.seed)


def write_table(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """A CSV file, atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_exclusions(out_dir: Path, data: Dataset) -> None:
    """excluded.csv and excluded.png: the outliers and unreadable files left out of the run."""
    write_table(out_dir / "excluded.csv", ["path", "label", "grey_variance", "reason"], [[e["path"], e["label"], e["grey_variance"], e["reason"]] for e in data.excluded])
    contact_sheet([Path(e["path"]) for e in data.excluded], [f"{e['label']} v={e['grey_variance'] or '?'}" for e in data.excluded], out_dir / "excluded.png")


def write_split(out_dir: Path, data: Dataset, split: dict[str, np.ndarray]) -> None:
    """split.csv: every usable image with its class, sample group and part."""
    part_of = {int(i): part for part, idx in split.items() for i in idx}
    rows = [[str(data.paths[i]), data.classes[data.labels[i]], data.groups[i], part_of.get(i, "unused")] for i in range(len(data.paths))]
    write_table(out_dir / "split.csv", ["path", "label", "group", "part"], rows)


def write_metrics(out_dir: Path, config: Config, data: Dataset, split: dict[str, np.ndarray], scores: dict[str, dict[str, Any]], label: str, precision: str, **record: Any) -> dict[str, Any]:
    """metrics.json (protocol, record such as parameters and timing, then the scored parts) and a
    confusion matrix per scored part; returns the metrics."""
    for part, m in scores.items():
        plot_confusion(m["confusion_matrix"], data.classes, out_dir / f"confusion_{part}.png", f"{label}, {part} ({config.data.split} split)")
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
        "metric_average": "macro over classes",
    }
    metrics = {"model": config.train.model, "model_args": model_args(config), "classes": data.classes, "protocol": protocol, **record, **scores}
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def write_fit_outputs(out_dir: Path, config: Config, data: Dataset, split: dict[str, np.ndarray], result: FitResult) -> dict[str, Any]:
    """metrics.json, history.csv and the figures of a finished fit; returns the metrics."""
    keys = list(result.history[0]) if result.history else []
    write_table(out_dir / "history.csv", keys, [[h[k] for k in keys] for h in result.history])
    if result.history:
        plot_history(result.history, out_dir / "training_curves.png", f"{config.train.model} ({config.data.split} split)")
    images_seen = sum(h["seconds"] * h["images_per_s"] for h in result.history)
    timing = {
        "train_seconds": result.train_seconds,
        "epochs_run": len(result.history),
        "train_images_per_s": images_seen / result.train_seconds if result.train_seconds else None,
        "eval_seconds": {part: m["seconds"] for part, m in result.metrics.items()},
    }
    return write_metrics(out_dir, config, data, split, result.metrics, config.train.model, result.precision, parameters=result.parameters, timing=timing, best_epoch=result.best_epoch, stop_reason=result.stop_reason)


def finished_run(config: Config, out_dir: Path) -> dict[str, Any] | None:
    """The metrics of a finished run of this config in out_dir, None if not finished; another config is refused."""
    saved = out_dir / "config.json"
    if not saved.exists():
        return None
    if not same_config(json.loads(saved.read_text()), config.to_dict()):
        raise DefungiError(f"{out_dir} holds a run with another config; use 'defungi train --resume {out_dir}' or a new --out")
    if (out_dir / "metrics.json").exists():
        log.info("%s is finished; delete it to train again", out_dir)
        return json.loads((out_dir / "metrics.json").read_text())
    return None


def train_run(config: Config, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train per config into out_dir; a finished run is returned as is, an interrupted one resumes."""
    out_dir = Path(out_dir)
    done = finished_run(config, out_dir)
    if done is not None:
        return done
    data = dataset_for(config, progress)
    return run_into(config, data, split_for(config, data), out_dir)


def run_into(config: Config, data: Dataset, split: dict[str, np.ndarray], out_dir: Path) -> dict[str, Any]:
    """Fit (or resume) into out_dir, write the run folder, return its metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "config.json", config.to_dict())
    write_exclusions(out_dir, data)
    write_split(out_dir, data, split)
    log.info("split (%s): %s", config.data.split, {k: len(v) for k, v in split.items()})
    if config.train.ensemble > 1:
        return ensemble_run(config, data, split, out_dir)
    return write_fit_outputs(out_dir, config, data, split, fit(config, data, split, out_dir))


def ensemble_run(config: Config, data: Dataset, split: dict[str, np.ndarray], out_dir: Path) -> dict[str, Any]:
    """train.ensemble fits that differ only in seed, each a run folder out_dir/member-K (finished ones
    are read back), scored together by the mean of their probabilities; returns the ensemble's metrics."""
    tc = config.train
    members = []
    for k in range(tc.ensemble):
        member = load_config_from(config, {"train.ensemble": 1, "train.seed": tc.seed + k})
        member_dir = out_dir / f"member-{k}"
        log.info("ensemble member %d/%d (seed %d)", k + 1, tc.ensemble, tc.seed + k)
        members.append(finished_run(member, member_dir) or run_into(member, data, split, member_dir))
    trained = load_trained(out_dir)
    scores = score_parts(trained.model, data, split, trained.preprocess, trained.device, tc, trained.class_weights())
    histories = [read_history(out_dir / f"member-{k}" / "history.csv") for k in range(tc.ensemble)]
    plot_epoch_curves(histories, [f"seed {tc.seed + k}" for k in range(tc.ensemble)], out_dir / "training_curves.png", f"{tc.model} x{tc.ensemble}: members' validation macro-F1 per epoch")
    timings = [m["timing"] for m in members]
    timing = {
        "train_seconds": sum(t["train_seconds"] for t in timings),
        "epochs_run": sum(t["epochs_run"] for t in timings),
        "train_images_per_s": float(np.mean([t["train_images_per_s"] or np.nan for t in timings])),
        "eval_seconds": {part: m["seconds"] for part, m in scores.items()},
    }
    return write_metrics(
        out_dir, config, data, split, scores, f"{tc.model} x{tc.ensemble}", members[0]["protocol"]["precision"],
        parameters=sum(m["parameters"] for m in members),
        timing=timing,
        best_epoch=[m["best_epoch"] for m in members],
        stop_reason="; ".join(f"seed {tc.seed + k}: {m['stop_reason']}" for k, m in enumerate(members)),
        members=[{"seed": tc.seed + k, "run": str(out_dir / f"member-{k}")} | {part: {key: m[part][key] for key in ("accuracy", "precision", "recall", "f1")} for part in scores} for k, m in enumerate(members)],
    )


def read_history(path: Path) -> list[dict[str, float]]:
    """history.csv of a finished fit, as written by write_fit_outputs."""
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def fit_cached(config: Config, data: Dataset, split: dict[str, np.ndarray], out_dir: Path) -> dict[str, Any]:
    """fit() into out_dir once: a finished fit is read back from result.json, a broken one resumes.

    Used by the experiments (curves, grids, studies) so that re-running them redoes nothing.
    """
    done = out_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = out_dir / "config.json"
    if saved.exists() and not same_config(json.loads(saved.read_text()), config.to_dict()):
        raise DefungiError(f"{out_dir} holds a fit with another config; delete it or use another experiment folder")
    atomic_write_json(saved, config.to_dict())
    result = fit(config, data, split, out_dir)
    summary = {
        "history": result.history,
        "metrics": result.metrics,
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
        "train_seconds": result.train_seconds,
        "precision": result.precision,
        "sizes": {part: int(len(idx)) for part, idx in split.items()},
    }
    atomic_write_json(done, summary)
    return summary


def resume_config(run_dir: str | Path) -> Config:
    """The config saved in a run folder (for --resume)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise DefungiError(f"{path}: not a run folder (no config.json); start it with 'defungi train --out {run_dir}'")
    return config_from_dict(json.loads(path.read_text()))


def evaluate_run(run_dir: str | Path, data_root: str | Path, out_dir: str | Path | None = None, tta: bool | None = None, prior_weight: float | None = None) -> dict[str, Any]:
    """Score a trained run on any labelled folder; metrics.json and a confusion matrix in out_dir."""
    trained = load_trained(run_dir)
    data = load_dataset(data_root, trained.preprocess.image_size, trained.config.data.variance_threshold, classes=trained.classes)
    use_tta = trained.config.train.tta if tta is None else tta
    power = trained.config.train.prior_weight if prior_weight is None else prior_weight
    weights = trained.class_weights(power)
    probs, loss = evaluate(trained.model, data.images, data.labels, trained.preprocess, trained.device, tta=use_tta, amp=trained.config.train.amp, class_weights=weights)
    metrics = classification_metrics(data.labels, probs.argmax(1), trained.classes) | {
        "loss": loss,
        "data": str(data_root),
        "run": str(run_dir),
        "tta": use_tta,
        "prior_weight": power if weights is not None else 0.0,
        "excluded": data.excluded,
    }
    out = Path(out_dir) if out_dir else Path(run_dir) / "evaluations" / Path(data_root).resolve().name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    plot_confusion(metrics["confusion_matrix"], trained.classes, out / "confusion.png", f"{trained.info['model_name']} on {Path(data_root).name}")
    metrics["out_dir"] = str(out)
    return metrics
