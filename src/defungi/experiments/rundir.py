"""The run folder: the one owner of its files, its config guard, resume and "finished".

A run folder is finished when metrics.json exists (written last); an unfinished one with
last.pt resumes from its last epoch; config.json guards it against another config. Its checkpoints
(their schema, and the run's model loaded from them: train.checkpoint) are written here atomically.
An ensemble run holds one run folder per member (member-K), a cross-validation one per fold
(fold-K); together they are the run's model.
"""

from __future__ import annotations

import csv
import io
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defungi.config import Config, same_config
from defungi.data.dataset import Dataset
from defungi.data.scan import scan
from defungi.errors import DefungiError
from defungi.layout import RunLayout, read_history, read_table
from defungi.results.history import EpochRow
from defungi.results.run import RunMetrics, read_run_metrics
from defungi.results.schema import to_dict
from defungi.train.checkpoint import load_checkpoint, read_config, write_ood
from defungi.train.ood import OodDetector
from defungi.train.runtime import atomic_torch_save
from defungi.utils import atomic_write_json, atomic_write_text, check_output, exclusive_lock


def claim_config(path: Path, config: Config, folder: Path, hint: str) -> None:
    """Write config to path, or check that the config stored there is the same one (else: error with hint)."""
    if path.exists():
        stored = read_config(path).to_dict()
        if not same_config(stored, config.to_dict()):
            changed = _changed_keys(stored, config.to_dict())
            raise DefungiError(
                f"{folder} holds a run with another config ({', '.join(changed) or 'data root'}); {hint}"
            )
        return
    atomic_write_json(path, config.to_dict())


def _changed_keys(a: dict[str, Any], b: dict[str, Any], where: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for key in a:
        if isinstance(a[key], dict) and isinstance(b.get(key), dict) and key != "model_args":
            keys += _changed_keys(a[key], b[key], f"{where}{key}.")
        elif a[key] != b.get(key) and key != "root":
            keys.append(f"{where}{key}")
    return keys


@dataclass
class FitRecord:
    """A finished run read back: its metrics.json and its per-epoch history."""

    metrics: RunMetrics
    history: list[EpochRow]
    path: Path

    def score(self, part: str, key: str = "f1") -> float:
        """One metric of one scored part, e.g. score('val') is the validation macro-F1."""
        return getattr(self.metrics.part(part), key)


SPLIT_COLUMNS = ("path", "label", "group", "part", "bytes")  # split.csv
EXCLUDED_COLUMNS = ("path", "label", "grey_variance", "reason")  # excluded.csv


class RunDir:
    """One run folder; every read and write of its files goes through here."""

    def __init__(self, root: str | Path) -> None:
        self.layout = RunLayout(Path(root))
        self.root = self.layout.root

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def member(self, k: int) -> RunDir:
        """The run folder of ensemble member k."""
        return RunDir(self.layout.member(k).root)

    def fold(self, k: int) -> RunDir:
        """The run folder of cross-validation fold k."""
        return RunDir(self.layout.fold(k).root)

    # ---- config and "finished" -------------------------------------------------------------

    def prepare(self) -> None:
        """Check, before any decoding, that the folder can hold a run: not a file, not under a file,
        writable."""
        check_output(self.root, "--out")

    def lock(self) -> AbstractContextManager[None]:
        """The folder's exclusive lock, held while training into it."""
        busy = f"{self.root} is in use by another defungi process (pid {{pid}}); wait for it, or use another --out"
        return exclusive_lock(self.root / ".lock", busy)

    def started(self) -> bool:
        """Whether training has left anything to resume or read back (a checkpoint or metrics, here
        or in a fold or member)."""
        if any(p.exists() for p in (self.layout.last, self.layout.best, self.layout.metrics)):
            return True
        return any(part.root.is_dir() and part.started() for part in (self.fold(0), self.member(0)))

    def claim(self, config: Config) -> None:
        """Create the folder for config, or check that it already holds a run of the same config (a
        folder whose start failed before any training takes the new config)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.layout.config.exists() and not self.started():
            self.layout.config.unlink()
        claim_config(
            self.layout.config,
            config,
            self.root,
            f"use a new --out, or 'defungi train --resume {self.root}' to continue that one",
        )

    def config(self) -> Config:
        """The config the run was started with (for --resume)."""
        if not self.layout.config.exists():
            raise DefungiError(
                f"{self.layout.config}: not a run folder (no config.json); "
                f"start it with 'defungi train --out {self.root}'"
            )
        return read_config(self.layout.config)

    def finished(self) -> FitRecord | None:
        """The record of a finished run, None if it has not finished."""
        if not self.layout.metrics.exists():
            return None
        metrics = read_run_metrics(self.layout.metrics)
        history = read_history(self.layout.history) if self.layout.history.exists() else []
        return FitRecord(metrics, history, self.root)

    # ---- plain files -----------------------------------------------------------------------

    def write_split(self, dataset: Dataset, split: dict[str, np.ndarray]) -> None:
        """split.csv: every usable image with its class, specimen, part and file size (the run's
        record of its data, checked when it is resumed or read back)."""
        part_of = {int(i): part for part, idx in split.items() for i in idx}
        rows = [
            [str(p), dataset.classes[dataset.labels[i]], dataset.specimens[i], part_of.get(i, "unused"), _size(p)]
            for i, p in enumerate(dataset.paths)
        ]
        _write_csv(self.layout.split, list(SPLIT_COLUMNS), rows)

    def check_split(self, dataset: Dataset, split: dict[str, np.ndarray]) -> None:
        """Refuse to resume or read back a started run whose images were added, removed, changed
        (another size) or put in another part since, naming the difference."""
        if not (self.layout.split.exists() and self.started()):
            return
        stored = {r["path"]: r for r in read_table(self.layout.split, SPLIT_COLUMNS)}
        part_of = {str(dataset.paths[i]): part for part, idx in split.items() for i in idx}
        now = {str(p): part_of.get(str(p), "unused") for p in dataset.paths}
        moved = sorted(p for p in stored.keys() & now.keys() if stored[p]["part"] != now[p])
        problems = _changes(_file_changes(stored, set(now)) | {"moved": moved})
        if problems:
            raise DefungiError(
                f"{self.root} was trained on other images or another split: {problems}; "
                "train into a new --out (a curve, grid or study with other settings needs its own)"
            )

    def data_changes(self, root: str) -> str:
        """What changed in the data folder root since the run recorded its images (split.csv and
        excluded.csv), found by listing it, without decoding: images added, removed and changed (another
        size), with an example of each; "" when nothing did or the run recorded none."""
        if not self.layout.split.exists():
            return ""
        stored = {r["path"]: r for r in read_table(self.layout.split, SPLIT_COLUMNS)}
        if self.layout.excluded.exists():  # left out when it trained, but there: neither added nor removed
            stored |= {r["path"]: r for r in read_table(self.layout.excluded, EXCLUDED_COLUMNS)}
        try:
            now = {str(r.path) for r in scan(root, min_classes=1)}
        except DefungiError:  # the folder gone, or no class folder left: none of its images is there
            now = set()
        return _changes(_file_changes(stored, now))

    def write_exclusions(self, dataset: Dataset) -> None:
        """excluded.csv: the outliers and unreadable files left out of the run."""
        write_exclusions(self.layout.excluded, dataset)

    def write_predictions(
        self, part: str, dataset: Dataset, idx: np.ndarray, probs: np.ndarray, ood: np.ndarray | None = None
    ) -> None:
        """predictions_PART.csv: per image its path, specimen (column 'sample'), class, out-of-distribution score (when
        given; over 1: refused), prediction and class probabilities."""
        extra = {"ood": [f"{x:.4f}" for x in ood]} if ood is not None else None
        write_predictions(self.layout.predictions(part), dataset, idx, probs, extra)

    def write_result(self, history: list[EpochRow], metrics: RunMetrics) -> FitRecord:
        """history.csv (no header without epochs), then metrics.json (which marks the run finished)."""
        rows = [to_dict(h) for h in history]
        _write_csv(self.layout.history, list(rows[0]) if rows else [], [list(r.values()) for r in rows])
        atomic_write_json(self.layout.metrics, to_dict(metrics))
        return FitRecord(metrics, history, self.root)

    # ---- checkpoints -----------------------------------------------------------------------

    def save_best(self, checkpoint: dict[str, Any]) -> None:
        """best.pt: the scored weights of the best epoch so far."""
        atomic_torch_save(checkpoint, self.layout.best)

    def save_last(self, checkpoint: dict[str, Any], training_state: dict[str, Any]) -> None:
        """last.pt: the checkpoint plus what a resume needs (training weights, optimiser,
        schedule, callbacks, history, time)."""
        atomic_torch_save(checkpoint | training_state, self.layout.last)

    def save_ood(self, detector: OodDetector) -> None:
        """ood.npz: the fit's refusal of non-micrographs (see train.checkpoint.read_ood)."""
        write_ood(self.layout.ood, detector)

    def resume_state(self, device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None] | None:
        """(last.pt, the best weights) of an interrupted fit, or None for a fresh start."""
        if not self.layout.last.exists():
            return None
        last = load_checkpoint(self.layout.last, device)
        best = load_checkpoint(self.layout.best, device)["state_dict"] if self.layout.best.exists() else None
        return last, best


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """A CSV file, atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _file_changes(stored: dict[str, dict[str, str]], now: set[str]) -> dict[str, list[str]]:
    """The image paths added, removed and changed (another size than its recorded bytes) between stored
    (the recorded rows by path) and now (the paths there now)."""
    common = stored.keys() & now
    return {
        "added": sorted(now - stored.keys()),
        "removed": sorted(stored.keys() - now),
        "changed": sorted(p for p in common if stored[p].get("bytes", "") not in ("", str(_size(Path(p))))),
    }


def _changes(paths: dict[str, list[str]]) -> str:
    """'2 added (e.g. PATH), 1 removed (e.g. PATH)': how many of each change, with an example ("" for none)."""
    return ", ".join(f"{len(found)} {what} (e.g. {found[0]})" for what, found in paths.items() if found)


def _size(path: Path) -> int:
    """A file's size in bytes (-1 when it is gone)."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def write_predictions(
    path: Path, dataset: Dataset, idx: np.ndarray, probs: np.ndarray, extra: dict[str, list[Any]] | None = None
) -> None:
    """Per image: path, specimen (column 'sample'), class, prediction, probability per class (and extra columns)."""
    extra = extra or {}
    header = ["path", "sample", "class", *extra, "prediction", *(f"p_{c}" for c in dataset.classes)]
    classes = dataset.classes
    rows = [
        [str(dataset.paths[i]), dataset.specimens[i], classes[dataset.labels[i]], *(v[j] for v in extra.values()),
         classes[int(p.argmax())], *(f"{x:.6f}" for x in p)]
        for j, (i, p) in enumerate(zip(idx, probs, strict=True))
    ]  # fmt: skip
    _write_csv(path, header, rows)


def write_exclusions(path: Path, dataset: Dataset) -> None:
    """The outliers and unreadable files left out, one row each (for a run or a study folder)."""
    _write_csv(path, list(EXCLUDED_COLUMNS), [[e[c] for c in EXCLUDED_COLUMNS] for e in dataset.excluded])
