"""Typed run configuration: a profile file, then overrides; unknown keys are an error."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Callable
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
    variance_threshold: float = 15.0  # grey variance at 224 px: docs/decisions/0002-variance-filter-for-blank-fields.md
    # luma: per-image mean/std over all channels (hue kept); image: per channel; dataset: training-set mean/std;
    # pretrained: the mean/std the model's pretrained weights were trained with
    normalize: str = "luma"
    split: str = "grouped"  # grouped: no specimen in two parts; random: as the study
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    # >= 2: K-fold cross-validation: every fold a run folder (fold-k) whose test part is one fold's
    # specimens and whose validation part is carved from the rest; scored out of fold
    cv_folds: int = 0
    # with cv_folds: fit only the first N of the K folds (0: all of them); the out-of-fold scores cover
    # those folds' test images (a cheaper estimate: the studies' random-split figure uses one fold)
    cv_fit_folds: int = 0


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
    ood: bool = True  # fit the refusal of non-micrographs (exploratory fits of a study skip it)
    seed: int = 0
    # a specimen's decision from its images' probabilities (stats.metrics.SPECIMEN_RULES): mean | log_mean
    # (geometric mean) | trimmed (per class, without each end's 20%); per-specimen metrics, predict, evaluate
    specimen_rule: str = "mean"
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


@dataclass(frozen=True)
class Rule:
    """What one config key accepts: ok(value), the fix a refusal names, and a value it refuses (the
    tests feed it to every key)."""

    ok: Callable[[Any], bool]
    fix: str
    refused: Any
    choices: tuple[str, ...] = ()  # a key with a fixed set of values: those


def between(low: float, high: float, fix: str, low_open: bool = False, high_open: bool = False) -> Rule:
    """A number in [low, high] (an open end excludes it); NaN and infinities are refused."""

    def ok(v: Any) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return isinstance(v, (int, float)) and math.isfinite(v) and above and below

    return Rule(ok, fix, high * 2 + 1 if high < 1e6 else low - 1)


def one_of(*options: str) -> Rule:
    return Rule(lambda v: v in options, f"use one of {', '.join(options)}", "nonesuch", options)


def matches(pattern: str, fix: str, refused: str) -> Rule:
    return Rule(lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None, fix, refused)


def _model_args_ok(args: Any) -> bool:
    numbers = [v for v in args.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return all(math.isfinite(v) and v >= 0 for v in numbers)


FLAG = Rule(lambda v: isinstance(v, bool), "use true or false", "maybe")
SEED = between(0, 2**32 - 1, "use a seed from 0 to 4294967295")
MIN_IMAGE_SIZE = 16  # px: the smallest input the models (patch 4 ConvMixer, ResNet stride 32) take usefully
MAX_IMAGE_SIZE = 1024  # px: the decoded cache holds 3 x size^2 bytes per image (9,114 images at 1024: 29 GB)
PRIOR_WEIGHT_RANGE = "use 0 (balanced decision) to 1 (training class frequencies)"
STEPS = 100_000  # a bound on epochs, patience and ensembles far past any useful value

# THE rule of every config key, in one place; validate checks them together, then the keys that
# depend on each other. Keys checked where they are used (a path, a model name) say so.
RULES: dict[str, Rule] = {
    "profile": Rule(lambda v: isinstance(v, str), "give a shipped profile or a .toml file", "nonesuch"),
    "data.root": Rule(lambda v: isinstance(v, str), "give a folder of class folders (checked on use)", "/nonesuch"),
    "data.image_size": between(
        MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, f"use {MIN_IMAGE_SIZE} px to {MAX_IMAGE_SIZE} px, e.g. 64"
    ),
    "data.variance_threshold": between(0, 1e9, "use 0 (keep every image) or more, e.g. 15", high_open=True),
    "data.normalize": one_of("image", "luma", "dataset", "pretrained"),
    "data.split": one_of("grouped", "random"),
    "data.val_fraction": between(0, 1, "use a share in (0, 1), e.g. 0.15", low_open=True, high_open=True),
    "data.test_fraction": between(0, 1, "use a share in [0, 1), e.g. 0.15", high_open=True),
    "data.seed": SEED,
    "data.cv_folds": Rule(lambda v: v == 0 or 2 <= v <= 1000, "use 0 (one split) or 2 to 1000 folds", 1),
    "data.cv_fit_folds": Rule(lambda v: 0 <= v <= 1000, "use 0 (every fold) or 1 to the number of folds", -1),
    "train.model": matches(
        r"[\w.\-/+]+", "give a registered model, a timm model name, or pretrained ones joined by +", "no such model"
    ),
    "train.model_args": Rule(_model_args_ok, "give sizes and rates as finite numbers of 0 or more", {"dim": -1}),
    "train.epochs": between(1, STEPS, "train 1 to 100000 epochs"),
    "train.batch_size": between(1, 2**20, "use a batch size from 1 to 1048576, e.g. 32"),
    "train.lr": between(0, 10, "use a learning rate in (0, 10], e.g. 1e-3", low_open=True),
    "train.weight_decay": between(0, 1, "use 0 (none) to 1, e.g. 0.05"),
    "train.optimizer": one_of("adamw", "sgd"),
    "train.schedule": one_of("onecycle", "cosine"),
    "train.warmup_fraction": between(0, 1, "use a share of the steps in [0, 1), e.g. 0.25", high_open=True),
    "train.label_smoothing": between(0, 1, "use 0 (none) to under 1, e.g. 0.1", high_open=True),
    "train.ema_decay": between(0, 1, "use 0 (no average) or a decay under 1, e.g. 0.995", high_open=True),
    "train.balance": FLAG,
    "train.augment": one_of("none", "basic", "strong"),
    "train.mix": one_of("none", "mixup", "cutmix", "both"),
    "train.mix_alpha": between(0, 100, "use a Beta parameter in (0, 100], e.g. 0.4", low_open=True),
    "train.tta": FLAG,
    "train.prior_weight": between(0, 1, PRIOR_WEIGHT_RANGE),
    "train.patience_epochs": between(0, STEPS, "use 0 to 100000 epochs, e.g. 5"),
    "train.restore_best": FLAG,
    "train.pretrained": FLAG,
    "train.weights": Rule(lambda v: isinstance(v, str), "give a weights file (checked on use)", "nowhere.pt"),
    "train.freeze_backbone": FLAG,
    "train.train_from": matches(r"[\w.]*", "give a module name such as blocks.5, or nothing", "blocks 5!"),
    "train.cached_views": between(1, 8, "use 1 (as is) to 8 (every flip/rotation)"),
    "train.backbone_lr_scale": between(0, 100, "use 0 to 100 (e.g. 0.1)"),
    "train.min_epochs": between(0, STEPS, "use 0 to 100000 epochs"),
    "train.amp": FLAG,
    "train.channels_last": FLAG,
    "train.ood": FLAG,
    "train.seed": SEED,
    "train.specimen_rule": one_of("mean", "log_mean", "trimmed"),  # the keys of stats.metrics.SPECIMEN_RULES
    "train.ensemble": between(1, 1000, "use 1 (one model) to 1000 (an ensemble of seeds)"),
    "train.device": matches(r"auto|cpu|mps|cuda(:\d+)?", "use auto, cpu, cuda, cuda:N or mps", "tpu"),
}


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return f"'{value}'" if isinstance(value, str) else json.dumps(value) if isinstance(value, dict) else str(value)


def config_keys(config: Config) -> dict[str, Any]:
    """Every key of config, dotted, with its value."""
    keys = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys |= {f"{f.name}.{g.name}": getattr(value, g.name) for g in dataclasses.fields(value)}
        else:
            keys[f.name] = value
    return keys


def validate(config: Config) -> Config:
    """Check every key against its rule (RULES), then the keys that depend on each other; the first
    refusal names the key, its value and what to use."""
    for key, value in config_keys(config).items():
        rule = RULES[key]
        if not rule.ok(value):
            raise DefungiError(f"config key '{key}' is {_shown(value)}; {rule.fix}")
    dc, tc = config.data, config.train
    if dc.val_fraction + dc.test_fraction >= 1:
        raise DefungiError(
            f"config keys 'data.val_fraction' ({dc.val_fraction:g}) and 'data.test_fraction' ({dc.test_fraction:g}): "
            "the validation part needs a share in (0, 1), the test part [0, 1), and both together under 1"
        )
    if tc.freeze_backbone and not (tc.pretrained or tc.weights):
        raise DefungiError(
            "train.freeze_backbone trains a head on a pretrained backbone; add --pretrained or --weights FILE"
        )
    if dc.cv_fit_folds > dc.cv_folds:
        raise DefungiError(
            f"config key 'data.cv_fit_folds' is {dc.cv_fit_folds}; fit at most the {dc.cv_folds} folds of "
            "data.cv_folds (0: all of them)"
        )
    if tc.train_from and not tc.freeze_backbone:
        raise DefungiError(
            "train.train_from trains the modules from there on the frozen ones' cached output; "
            "add --set train.freeze_backbone=true"
        )
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
    if isinstance(current, dict) and isinstance(value, dict):  # a dotted key into a table: model_args.dim=8
        return current | {key: _scalar(v) for key, v in value.items()}
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


def _scalar(value: Any) -> Any:
    """A table's value as its TOML/JSON reading gives it (a command line's '0.3' is 0.3, 'true' True),
    else the string itself."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


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


def profile_table(profile: str, _below: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A profile's TOML as nested tables; one with `base = "NAME"` is that profile's tables with its own
    values over them (a variant says only what differs; _below: the variants already on the way here).
    Its `profile` key, its name, is its own or else its file's name (a lab's mylab.toml: 'mylab')."""
    path = profile_path(profile)
    if path.resolve() in _below:
        raise DefungiError(f"{_below[-1]}: its base leads back to {path}; give a base that does not build on it")
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DefungiError(f"{path}: not a valid TOML profile ({exc}); fix it or give a shipped profile") from None
    except OSError as exc:
        raise DefungiError(f"{path}: cannot be read ({exc.strerror}); check the path and its permissions") from None
    base = table.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise DefungiError(f'{path}: base is {base!r}; give a profile\'s name or .toml path, e.g. base = "transfer"')
    table.setdefault("profile", path.stem)  # its name: its own profile key, else its file's (never its base's)
    return _over(profile_table(base, (*_below, path.resolve())), table) if base is not None else table


def _over(tables: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """tables with values over them, table by table (a table's other keys are kept)."""
    merged = dict(tables)
    for key, value in values.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _over(merged[key], value) if both else value
    return merged


def load_config(profile: str = "quick", overrides: dict[str, Any] | None = None) -> Config:
    """Profile (a shipped name or a .toml file) first, then dotted overrides such as {'train.lr': 1e-3};
    config.profile is the profile's name (see profile_table). The profile's [study] table is the published
    studies' (`defungi.experiments.studies` reads it from the same profile); a run has no study options.
    Pretrained weights bring the normalisation they were trained with, unless the overrides set
    data.normalize."""
    config = Config()
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
