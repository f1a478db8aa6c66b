"""The run folder: the one owner of its files, its checkpoint schema, resume and "finished".

A run folder is finished when metrics.json exists (written last); an unfinished one with
last.pt resumes from its last epoch; config.json guards it against another config. Checkpoints
are self-describing (model name and arguments, classes, preprocessing, config, class shares,
epoch, best metric), written here and read back here, so a run folder alone rebuilds its model.
An ensemble run holds one run folder per member (member-K), a cross-validation one per fold
(fold-K); together they are the run's model.
"""

from __future__ import annotations

import csv
import io
import logging
import zipfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from defungi.config import Config, config_from_dict, same_config
from defungi.data.dataset import Dataset
from defungi.data.scan import scan
from defungi.errors import DefungiError
from defungi.layout import RunLayout, read_history, read_json, read_table
from defungi.models import create_model, model_entry
from defungi.models.ensemble import Ensemble, SharedTrunk, shared_trunk
from defungi.models.registry import model_args as registry_model_args
from defungi.results.history import EpochRow
from defungi.results.run import RunMetrics, read_run_metrics
from defungi.results.schema import SCHEMA_VERSION, check_version, to_dict
from defungi.stats.metrics import prior_weights
from defungi.stats.refusal import held_out_needed
from defungi.train.frozen import FrozenPass, frozen_name
from defungi.train.loop import Preprocess
from defungi.train.ood import READING_KINDS, Distance, OodDetector, OodHooks, Reading
from defungi.train.runtime import atomic_torch_save, resolve_device
from defungi.utils import atomic_write_binary, atomic_write_json, atomic_write_text, check_output, exclusive_lock

log = logging.getLogger(__name__)


def model_args(config: Config) -> dict[str, Any]:
    """Registry defaults merged with the config's model_args (recorded in checkpoints)."""
    return registry_model_args(config.train.model, config.train.model_args)


def read_config(path: Path) -> Config:
    """A stored config.json, or one line naming the file (not JSON, or keys this version does not know:
    a folder written by another version of defungi)."""
    try:
        return config_from_dict(read_json(path))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
        raise DefungiError(f"{path}: not a readable config ({type(exc).__name__}); train into a new folder") from None
    except DefungiError as exc:
        raise DefungiError(f"{path}: {exc} (written by another defungi version?); train into a new folder") from None


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


@dataclass
class TrainedModel:
    """A model in eval mode with everything needed to feed it and read its output."""

    model: nn.Module
    preprocess: Preprocess
    classes: list[str]
    config: Config
    device: torch.device
    info: dict[str, Any]
    class_prior: list[float] | None = None
    detectors: list[OodDetector] | None = None  # one per member: what refuses non-micrographs (None: trained without)

    def class_weights(self, power: float | None = None) -> np.ndarray | None:
        """Probability weights for the decision (power: as trained when None; 0 switches them off)."""
        return prior_weights(self.class_prior, self.config.train.prior_weight if power is None else power)

    def frozen_pass(self) -> FrozenPass | None:
        """Where the model is heads on a shared frozen trunk: the trunk's one pass over images, reading
        the heads' input and the refusal detectors' readings (train.frozen); None for other models."""
        if not isinstance(self.model, SharedTrunk):
            return None
        name, head = self.info["model_name"], model_entry(self.info["model_name"]).parts.classifier
        readings = [Reading(head, "input"), *(r for d in self.detectors or [] for r in d.readings)]
        tc = self.config.train
        return FrozenPass(
            self.model.trunk, frozen_name(name, self.info["model_args"]), readings, self.preprocess, self.device,
            tc.amp, tc.channels_last,
        )  # fmt: skip

    def ood_hooks(self) -> OodHooks | None:
        """What scores, inside the model's forward passes, each image's distance from the training
        micrographs (None where the run has no detectors)."""
        return OodHooks(self.model, self.detectors).to(self.device) if self.detectors is not None else None


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

    def write_split(self, data: Dataset, split: dict[str, np.ndarray]) -> None:
        """split.csv: every usable image with its class, sample group, part and file size (the run's
        record of its data, checked when it is resumed or read back)."""
        part_of = {int(i): part for part, idx in split.items() for i in idx}
        rows = [
            [str(p), data.classes[data.labels[i]], data.groups[i], part_of.get(i, "unused"), _size(p)]
            for i, p in enumerate(data.paths)
        ]
        _write_csv(self.layout.split, list(SPLIT_COLUMNS), rows)

    def check_split(self, data: Dataset, split: dict[str, np.ndarray]) -> None:
        """Refuse to resume or read back a started run whose images were added, removed, changed
        (another size) or put in another part since, naming the difference."""
        if not (self.layout.split.exists() and self.started()):
            return
        stored = {r["path"]: r for r in read_table(self.layout.split, SPLIT_COLUMNS)}
        part_of = {str(data.paths[i]): part for part, idx in split.items() for i in idx}
        now = {str(p): part_of.get(str(p), "unused") for p in data.paths}
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

    def write_exclusions(self, data: Dataset) -> None:
        """excluded.csv: the outliers and unreadable files left out of the run."""
        write_exclusions(self.layout.excluded, data)

    def write_predictions(
        self, part: str, data: Dataset, idx: np.ndarray, probs: np.ndarray, ood: np.ndarray | None = None
    ) -> None:
        """predictions_PART.csv: per image its path, sample, class, out-of-distribution score (when
        given; over 1: refused), prediction and class probabilities."""
        extra = {"ood": [f"{x:.4f}" for x in ood]} if ood is not None else None
        write_predictions(self.layout.predictions(part), data, idx, probs, extra)

    def write_result(self, history: list[EpochRow], metrics: RunMetrics) -> FitRecord:
        """history.csv (no header without epochs), then metrics.json (which marks the run finished)."""
        rows = [to_dict(h) for h in history]
        _write_csv(self.layout.history, list(rows[0]) if rows else [], [list(r.values()) for r in rows])
        atomic_write_json(self.layout.metrics, to_dict(metrics))
        return FitRecord(metrics, history, self.root)

    # ---- checkpoints -----------------------------------------------------------------------

    @staticmethod
    def checkpoint(
        model: nn.Module,
        config: Config,
        classes: list[str],
        preprocess: Preprocess,
        class_prior: list[float] | None,
        epoch: int,
        best_metric: float,
    ) -> dict[str, Any]:
        """A self-describing checkpoint: enough to rebuild the model with no other file."""
        return {
            "schema_version": SCHEMA_VERSION,
            "model_name": config.train.model,
            "model_args": model_args(config),
            "classes": list(classes),
            "preprocess": {
                "image_size": preprocess.image_size,
                "mean": list(preprocess.mean),
                "std": list(preprocess.std),
                "normalize": preprocess.normalize,
            },
            "config": config.to_dict(),
            "class_prior": class_prior,  # training class shares when trained class-balanced (see prior_weights)
            "epoch": epoch,
            "best_metric": best_metric,
            "state_dict": model.state_dict(),
        }

    def save_best(self, checkpoint: dict[str, Any]) -> None:
        """best.pt: the scored weights of the best epoch so far."""
        atomic_torch_save(checkpoint, self.layout.best)

    def save_last(self, checkpoint: dict[str, Any], training_state: dict[str, Any]) -> None:
        """last.pt: the checkpoint plus what a resume needs (training weights, optimiser,
        schedule, callbacks, history, time)."""
        atomic_torch_save(checkpoint | training_state, self.layout.last)

    def save_ood(self, detector: OodDetector) -> None:
        """ood.npz: the fit's refusal of non-micrographs (see read_ood)."""
        arrays = {"threshold": detector.threshold, "quantile": detector.quantile, "held_out": detector.held_out}
        for i, d in enumerate(detector.distances):
            arrays |= {f"{i}.module": d.reading.module, f"{i}.kind": d.reading.kind, f"{i}.scale": d.scale}
            arrays |= {f"{i}.projection": d.projection, f"{i}.means": d.means}
        atomic_write_binary(self.layout.ood, lambda fh: np.savez(fh, schema_version=SCHEMA_VERSION, **arrays))

    def scored_checkpoint(self) -> Path:
        """The checkpoint holding the weights the run was scored with."""
        restore_best = self.config().train.restore_best if self.layout.config.exists() else True
        return self.layout.best if restore_best else self.layout.last

    def resume_state(self, device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None] | None:
        """(last.pt, the best weights) of an interrupted fit, or None for a fresh start."""
        if not self.layout.last.exists():
            return None
        last = _load(self.layout.last, device)
        best = _load(self.layout.best, device)["state_dict"] if self.layout.best.exists() else None
        return last, best


def _load(path: Path, device: torch.device, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's contents (weights_only), or a clear error. mmap: its tensors read from the file as
    they are used (a model that answers: a fifth sooner for three folds' checkpoints), not for one
    that goes on training and writes over it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DefungiError(f"{path}: unreadable checkpoint ({type(exc).__name__}); train again") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise DefungiError(f"{path}: not a defungi checkpoint; train again into a new folder")
    check_version(state.get("schema_version"), path)
    return state


def read_ood(path: Path) -> OodDetector | None:
    """The detector a fit stored (None where it has none: see _no_detector)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = dict(stored)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DefungiError(
            f"{path}: unreadable ({type(exc).__name__}); train the run again into a new folder"
        ) from None
    version = arrays.get("schema_version")
    check_version(None if version is None else int(version), path)
    try:
        count = len({k.split(".")[0] for k in arrays if k.split(".")[0].isdigit()})
        readings = [Reading(str(arrays[f"{i}.module"]), str(arrays[f"{i}.kind"])) for i in range(count)]
        if not readings or any(r.kind not in READING_KINDS for r in readings):
            raise ValueError("no or unknown readings")
        distances = tuple(
            Distance(r, arrays[f"{i}.projection"], arrays[f"{i}.means"], float(arrays[f"{i}.scale"]))
            for i, r in enumerate(readings)
        )
        return OodDetector(distances, float(arrays["threshold"]), float(arrays["quantile"]), int(arrays["held_out"]))
    except (KeyError, TypeError, ValueError):
        raise DefungiError(f"{path}: not a defungi detector; train the run again into a new folder") from None


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
    path: Path, data: Dataset, idx: np.ndarray, probs: np.ndarray, extra: dict[str, list[Any]] | None = None
) -> None:
    """Per image: path, sample, class, prediction, probability per class (and extra columns)."""
    extra = extra or {}
    header = ["path", "sample", "class", *extra, "prediction", *(f"p_{c}" for c in data.classes)]
    rows = [
        [str(data.paths[i]), data.groups[i], data.classes[data.labels[i]], *(v[j] for v in extra.values()),
         data.classes[int(p.argmax())], *(f"{x:.6f}" for x in p)]
        for j, (i, p) in enumerate(zip(idx, probs, strict=True))
    ]  # fmt: skip
    _write_csv(path, header, rows)


def write_exclusions(path: Path, data: Dataset) -> None:
    """The outliers and unreadable files left out, one row each (for a run or a study folder)."""
    _write_csv(path, list(EXCLUDED_COLUMNS), [[e[c] for c in EXCLUDED_COLUMNS] for e in data.excluded])


def _rebuild(state: dict[str, Any], path: Path) -> torch.nn.Module:
    """The model a checkpoint describes, with its weights; one line naming the file when the
    checkpoint does not describe the weights it holds (another program's, another shape)."""
    try:
        model = create_model(state["model_name"], num_classes=len(state["classes"]), **state["model_args"])
        model.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, DefungiError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        what = f"no {exc}" if isinstance(exc, KeyError) else lines[min(1, len(lines) - 1)][:200]  # torch: 2nd says why
        raise DefungiError(f"{path}: its weights do not fit the model it names ({what}); train again") from None
    return model


def load_checkpoints(paths: list[Path], device: str = "auto") -> TrainedModel:
    """Rebuild a model from its self-describing checkpoints (weights_only, all present); several (the folds of a
    cross-validation, the members of an ensemble) are one model that averages their probabilities,
    with the mean of their class shares."""
    dev = resolve_device(device)
    states = [_load(p, dev, mmap=True) for p in paths]
    model = _combined(states, paths)
    model.to(dev, memory_format=torch.channels_last).eval()
    state = states[0]  # the parts share classes and the normalisation rule
    pre = state["preprocess"]
    if pre["normalize"] == "dataset" and any(s["preprocess"] != pre for s in states):
        raise DefungiError(
            f"{paths[0].parent.parent}: its parts were normalised with different training-set statistics; "
            "use one part's folder"
        )
    preprocess = Preprocess(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), pre["normalize"])
    priors = [s.get("class_prior") for s in states]
    class_prior = None if priors[0] is None else np.mean(priors, axis=0).tolist()
    info = {k: state[k] for k in ("model_name", "model_args", "epoch", "best_metric")} | {"members": len(states)}
    detectors = [read_ood(RunLayout(p.parent).ood) for p in paths]
    try:
        config = config_from_dict(state["config"])
    except DefungiError as exc:
        raise DefungiError(f"{paths[0]}: its config: {exc}; train again into a new folder") from None
    return TrainedModel(
        model, preprocess, state["classes"], config, dev, info, class_prior, _all_or_none(detectors, paths, states)
    )


def _combined(states: list[dict[str, Any]], paths: list[Path]) -> torch.nn.Module:
    """The parts (checkpoints' contents) as one model: heads trained on one frozen backbone share it,
    built once (models.ensemble.SharedTrunk: the backbone runs once per image, in training's frozen
    pass too), other parts are an Ensemble."""
    name, args = states[0]["model_name"], states[0]["model_args"]
    head = model_entry(name).parts.classifier
    trains = [s["config"].get("train", {}) for s in states]
    frozen = all(t.get("freeze_backbone") and t.get("train_from", "") in ("", head) for t in trains)
    first = _rebuild(states[0], paths[0])
    if frozen and all(s["model_name"] == name and s["model_args"] == args for s in states):
        shared = shared_trunk(first, [s["state_dict"] for s in states], head)
        if shared is not None:
            return shared
    rest = [_rebuild(state, path) for state, path in zip(states[1:], paths[1:], strict=True)]
    return Ensemble([first, *rest]) if rest else first


def _all_or_none(
    detectors: list[OodDetector | None], paths: list[Path], states: list[dict[str, Any]]
) -> list[OodDetector] | None:
    """Every member's detector, or None (with a warning saying why) when some member has none: a model refuses
    non-micrographs only when all its members can say how far an image is from their training images."""
    present = [d for d in detectors if d is not None]
    if len(present) == len(detectors):
        return present
    why = dict.fromkeys(_no_detector(s, p) for d, s, p in zip(detectors, states, paths, strict=True) if d is None)
    log.warning(
        "%s: %s no refusal detector (%s); every image is answered",
        paths[0].parent,
        "it has" if len(detectors) == 1 else f"{len(detectors) - len(present)} of its {len(detectors)} models have",
        "; ".join(why),
    )
    return None


def _no_detector(state: dict[str, Any], checkpoint: Path) -> str:
    """Why the fit of a checkpoint has no refusal detector: trained without one, with too few validation
    images to fit one (its metrics.json says how many), or before defungi refused non-micrographs."""
    if not state["config"].get("train", {}).get("ood", True):
        return "trained without one: train.ood = false"
    metrics = RunLayout(checkpoint.parent).metrics
    val = read_run_metrics(metrics).protocol.sizes.get("val") if metrics.exists() else None
    if val is not None and val < held_out_needed():
        return f"{val} validation images are too few to fit one ({held_out_needed()} needed)"
    return "trained before defungi refused non-micrographs"
