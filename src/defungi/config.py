"""Typed run configuration: a profile file, then overrides; unknown keys are an error."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from defungi.errors import DefungiError


@dataclass
class DataConfig:
    """Where the images are and how they are filtered, resized and split."""

    root: str = ""
    image_size: int = 64
    variance_threshold: float = 15.0  # grey-level variance at 224 px; see README "Outliers"
    # luma: per-image mean/std over all channels (hue kept); image: per channel; dataset: training-set mean/std;
    # pretrained: the mean/std the model's pretrained weights were trained with
    normalize: str = "luma"
    split: str = "grouped"  # grouped: no physical sample in two parts; random: as the study
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    # >= 2: K-fold cross-validation: every fold a run folder (fold-k) whose test part is one fold's
    # samples and whose validation part is carved from the rest; scored out of fold
    cv_folds: int = 0


@dataclass
class TrainConfig:
    """Model, optimiser, schedule, augmentation and stopping."""

    model: str = "resnet34"
    model_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 14
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # adamw | sgd
    schedule: str = "onecycle"  # onecycle | cosine
    warmup_fraction: float = 0.25
    label_smoothing: float = 0.1
    ema_decay: float = 0.0  # > 0: evaluate and keep an exponential moving average of the weights
    balance: bool = True  # oversample minority classes with augmentation
    augment: str = "basic"  # none | basic (flips, 90-degree rotations, jitter) | strong (+ crops)
    mix: str = "none"  # none | mixup | cutmix | both: blend image pairs and their labels
    mix_alpha: float = 0.4
    tta: bool = True  # average the 8 flips/rotations at evaluation
    # with balance: scale predicted probabilities by (training class share)**prior_weight; 0: the balanced decision
    prior_weight: float = 0.5
    patience_epochs: int = 5
    restore_best: bool = True  # score the weights of the best validation epoch; false: the last epoch's
    pretrained: bool = False  # start from the model's ImageNet weights (head replaced)
    weights: str = ""  # or from this file: a state dict or a torchvision / timm / defungi checkpoint
    freeze_backbone: bool = False  # train the head alone, on backbone features computed once per image (cached)
    train_from: str = ""  # with freeze_backbone: the first module that trains (e.g. blocks.5); "" = the head
    # with freeze_backbone: the frozen part's output is cached for this many of the 8 flips/rotations of each
    # image (1: the image as is); every epoch trains on one of them per image, at random; all 8 with tta: the
    # scores average the 8 cached views' probabilities (no image passes through the backbone again)
    cached_views: int = 1
    backbone_lr_scale: float = 1.0  # the backbone's learning rate relative to the head's (fine-tuning: e.g. 0.1)
    min_epochs: int = 0
    # mixed precision: bf16 on CUDA where supported (else fp16) and on CPUs with native bf16 (AVX512-BF16, AMX)
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    ensemble: int = 1  # > 1: that many fits differing only in seed (train.seed + k), scored by their mean probability
    device: str = "auto"


@dataclass
class Config:
    """Everything a run needs; written to the run folder as config.json. (A published study's own
    options, a profile's [study] table, live with the study: `defungi.experiments.studies`.)"""

    profile: str = "quick"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-safe)."""
        return dataclasses.asdict(self)


CHOICES = {
    "data.split": ("grouped", "random"),
    "data.normalize": ("image", "luma", "dataset", "pretrained"),
    "train.optimizer": ("adamw", "sgd"),
    "train.schedule": ("onecycle", "cosine"),
    "train.augment": ("none", "basic", "strong"),
    "train.mix": ("none", "mixup", "cutmix", "both"),
}


PRIOR_WEIGHT_RANGE = "use 0 (balanced decision) to 1 (training class frequencies)"
MIN_IMAGE_SIZE = 16  # px: the smallest input the models (patch 4 ConvMixer, ResNet stride 32) take usefully


def validate(config: Config) -> Config:
    """Reject values outside the known choices, naming the key and the options."""
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in options:
            raise DefungiError(f"config key '{key}' is '{value}'; use one of {', '.join(options)}")
    if config.data.cv_folds == 1 or config.data.cv_folds < 0:
        raise DefungiError(
            f"config key 'data.cv_folds' is {config.data.cv_folds}; use 0 (one split) or 2 or more folds"
        )
    if config.train.ensemble < 1:
        raise DefungiError(
            f"config key 'train.ensemble' is {config.train.ensemble}; use 1 (one model) or more (an ensemble of seeds)"
        )
    if not 0 <= config.train.prior_weight <= 1:  # also NaN
        raise DefungiError(f"config key 'train.prior_weight' is {config.train.prior_weight:g}; {PRIOR_WEIGHT_RANGE}")
    for key, value, low, fix in (
        ("train.epochs", config.train.epochs, 1, "train at least one epoch"),
        ("train.batch_size", config.train.batch_size, 1, "use a positive batch size, e.g. 32"),
        ("data.image_size", config.data.image_size, MIN_IMAGE_SIZE, f"use {MIN_IMAGE_SIZE} px or more, e.g. 64"),
    ):
        if value < low:
            raise DefungiError(f"config key '{key}' is {value}; {fix}")
    if not (math.isfinite(config.train.lr) and config.train.lr > 0):
        raise DefungiError(f"config key 'train.lr' is {config.train.lr:g}; use a positive learning rate, e.g. 1e-3")
    dc = config.data
    if not (0 < dc.val_fraction < 1 and 0 <= dc.test_fraction < 1 and dc.val_fraction + dc.test_fraction < 1):
        raise DefungiError(
            f"config keys 'data.val_fraction' ({dc.val_fraction:g}) and 'data.test_fraction' ({dc.test_fraction:g}): "
            "the validation part needs a share in (0, 1), the test part [0, 1), and both together under 1"
        )
    if not config.train.backbone_lr_scale >= 0:
        raise DefungiError(
            f"config key 'train.backbone_lr_scale' is {config.train.backbone_lr_scale:g}; use 0 or more (e.g. 0.1)"
        )
    if config.train.freeze_backbone and not (config.train.pretrained or config.train.weights):
        raise DefungiError(
            "train.freeze_backbone trains a head on a pretrained backbone; add --pretrained or --weights FILE"
        )
    if config.train.train_from and not config.train.freeze_backbone:
        raise DefungiError(
            "train.train_from trains the modules from there on the frozen ones' cached output; "
            "add --set train.freeze_backbone=true"
        )
    if not 1 <= config.train.cached_views <= 8:
        raise DefungiError(
            f"config key 'train.cached_views' is {config.train.cached_views}; use 1 (as is) to 8 (every flip/rotation)"
        )
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", config.train.device):
        raise DefungiError(f"config key 'train.device' is '{config.train.device}'; use auto, cpu, cuda, cuda:N or mps")
    return config


def same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two stored configs describe the same run: keys a stored config lacks (added by a
    later version) count at their defaults, and data roots are compared as resolved paths."""

    def normal(values: dict[str, Any]) -> dict[str, Any]:
        config = config_from_dict(values)
        config.data.root = str(Path(config.data.root).resolve()) if config.data.root else ""
        return config.to_dict()

    return normal(a) == normal(b)


def apply_values(obj: Any, values: dict[str, Any], where: str) -> None:
    """Set dataclass fields from a dict, recursing into nested sections; an unknown key is an error
    naming it (where: the keys' dotted prefix, e.g. 'train.')."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise DefungiError(f"unknown config key '{where}{key}'; known: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise DefungiError(f"config key '{where}{key}' is a section; give a table")
            apply_values(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, f"{where}{key}"))


def _coerce(value: Any, current: Any, name: str) -> Any:
    """Convert an override (often a string from the CLI) to the type of the current value."""
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise DefungiError(f"config key '{name}' wants true/false, got '{value}'")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if isinstance(current, (dict, list)):
        try:
            parsed = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, type(current)):
            raise DefungiError(f"config key '{name}' wants a {type(current).__name__} (JSON), got '{value}'")
        return parsed
    try:
        return type(current)(value)
    except (TypeError, ValueError):
        raise DefungiError(f"config key '{name}' wants {type(current).__name__}, got '{value}'") from None


def profile_path(name: str) -> Path:
    """Path of a named profile shipped with the package, or of a TOML file."""
    path = Path(name)
    if path.suffix == ".toml":
        if not path.is_file():
            raise DefungiError(f"config file not found: {path}")
        return path
    shipped = resources.files("defungi") / "configs" / f"{name}.toml"
    if not shipped.is_file():
        known = sorted(
            p.name[:-5] for p in (resources.files("defungi") / "configs").iterdir() if p.name.endswith(".toml")
        )
        raise DefungiError(f"unknown profile '{name}'; known: {', '.join(known)} (or a path to a .toml file)")
    return Path(str(shipped))


def profile_table(profile: str) -> dict[str, Any]:
    """A profile's TOML as nested tables; one with `base = "NAME"` is that profile's tables with its own
    values over them (a variant says only what differs)."""
    with open(profile_path(profile), "rb") as fh:
        table = tomllib.load(fh)
    base = table.pop("base", None)
    return _over(profile_table(base), table) if base is not None else table


def _over(tables: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """tables with values over them, table by table (a table's other keys are kept)."""
    merged = dict(tables)
    for key, value in values.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _over(merged[key], value) if both else value
    return merged


def load_config(profile: str = "quick", overrides: dict[str, Any] | None = None) -> Config:
    """Profile file first, then dotted overrides such as {'train.lr': 1e-3}. The profile's [study] table
    is the published studies' (`defungi.experiments.studies` reads it); a run has no study options.
    Pretrained weights bring the normalisation they were trained with, unless the overrides set
    data.normalize."""
    config = Config(profile=profile)
    table = profile_table(profile)
    table.pop("study", None)
    apply_values(config, table, "")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    config = load_config_from(config, overrides)
    if config.train.pretrained and "data.normalize" not in overrides and config.data.normalize != "pretrained":
        config = load_config_from(config, {"data.normalize": "pretrained"})
    return config


def nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested tables ({'train.lr': 1e-3} -> {'train': {'lr': 1e-3}}); None values left out."""
    tables: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = tables
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tables


def load_config_from(config: Config, overrides: dict[str, Any]) -> Config:
    """A copy of config with dotted overrides applied (None values are ignored)."""
    config = copy.deepcopy(config)
    tables = nested(overrides)
    if "study" in tables:
        key = next(k for k in overrides if k.split(".")[0] == "study")
        raise DefungiError(f"config key '{key}' sizes a published study, not a run; give it to 'defungi study'")
    apply_values(config, tables, "")
    return validate(config)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved by `Config.to_dict` (e.g. from a run folder)."""
    config = Config()
    apply_values(config, values, "")
    return validate(config)
