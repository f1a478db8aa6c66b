"""A trained model and its files: the checkpoint schema, the refusal detector's file, and the model of a
run folder loaded from them (below both `experiments`, which writes run folders, and `serve`, which answers
with them).

A checkpoint is self-describing (model name and arguments, classes, preprocessing, config, class shares,
epoch, best metric): `checkpoint_of` writes its keys and `load_checkpoint` reads them, so a run folder
alone rebuilds its model. An ensemble run's model is its members' (member-K), a cross-validation's its
folds' (fold-K, each itself or its members): `model_parts` says which, from the run's config alone.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from defungi.config import Config, config_from_dict
from defungi.errors import DefungiError
from defungi.layout import RunLayout, read_json
from defungi.models import create_model, model_entry
from defungi.models.ensemble import Ensemble, SharedTrunk, shared_trunk
from defungi.models.registry import model_args as registry_model_args
from defungi.results.run import read_run_metrics
from defungi.results.schema import SCHEMA_VERSION, check_version
from defungi.stats.metrics import prior_weights
from defungi.train.frozen import FrozenPass, frozen_name
from defungi.train.loop import Preprocess
from defungi.train.ood import READING_KINDS, Distance, OodDetector, OodHooks, Reading, held_out_needed
from defungi.train.runtime import resolve_device
from defungi.utils import atomic_write_binary

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


# ---- the checkpoint schema ------------------------------------------------------------------


def checkpoint_of(
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


def load_checkpoint(path: Path, device: torch.device, mmap: bool = False) -> dict[str, Any]:
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


def write_ood(path: Path, detector: OodDetector) -> None:
    """ood.npz: a fit's refusal of non-micrographs (see read_ood)."""
    arrays = {"threshold": detector.threshold, "quantile": detector.quantile, "held_out": detector.held_out}
    for i, d in enumerate(detector.distances):
        arrays |= {f"{i}.module": d.reading.module, f"{i}.kind": d.reading.kind, f"{i}.scale": d.scale}
        arrays |= {f"{i}.projection": d.projection, f"{i}.means": d.means}
    atomic_write_binary(path, lambda fh: np.savez(fh, schema_version=SCHEMA_VERSION, **arrays))


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


# ---- a run folder's model -------------------------------------------------------------------


def model_parts(config: Config, run: RunLayout) -> list[RunLayout]:
    """The run folders whose models together are the model of a run of config: its ensemble's members,
    its cross-validation's fitted folds (each itself, or its members), else the run's own folder."""
    members = config.train.ensemble

    def leaves(folder: RunLayout) -> list[RunLayout]:
        return [folder.member(k) for k in range(members)] if members > 1 else [folder]

    dc = config.data
    if dc.cv_folds >= 2:
        return [leaf for k in range(min(dc.cv_fit_folds or dc.cv_folds, dc.cv_folds)) for leaf in leaves(run.fold(k))]
    return leaves(run)


def scored_checkpoint(run: RunLayout) -> Path:
    """The checkpoint of a run folder holding the weights it was scored with (best.pt, or last.pt for a
    fit scored at its last epoch: train.restore_best = false)."""
    restore_best = read_config(run.config).train.restore_best if run.config.exists() else True
    return run.best if restore_best else run.last


def load_trained(run_dir: str | Path, device: str = "auto") -> TrainedModel:
    """Rebuild the model of a run folder from its checkpoints: its own best.pt (last.pt for a fit
    scored at its last epoch: train.restore_best = false), or those of its parts (the members of an
    ensemble, the folds of a cross-validation), loaded as one model that averages them."""
    run = RunLayout(Path(run_dir))
    parts = model_parts(read_config(run.config), run) if run.config.exists() else [run]
    paths = [scored_checkpoint(part) for part in parts]
    present = [p for p in paths if p.exists()]
    if not present:
        raise DefungiError(f"{run.best}: no checkpoint; train first with 'defungi train --out {run_dir}'")
    if len(present) < len(paths):
        raise DefungiError(
            f"{run_dir}: {len(present)} of its {len(paths)} models are trained; "
            f"finish it with 'defungi train --resume {run_dir}'"
        )
    return load_checkpoints(paths, device)


def load_checkpoints(paths: list[Path], device: str = "auto") -> TrainedModel:
    """Rebuild a model from its self-describing checkpoints (weights_only, all present); several (the folds of a
    cross-validation, the members of an ensemble) are one model that averages their probabilities,
    with the mean of their class shares."""
    dev = resolve_device(device)
    states = [load_checkpoint(p, dev, mmap=True) for p in paths]
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
