"""What each cut of the `quick` profile saves of the main job's time on this machine, by the plan.

The main job is planned (nothing trained) under the `full` profile, under `full` with each cut of
`quick` alone, and under `quick`, all with one probe of each model's speed, so that the rows differ
only by what they fit. Prints fits, epochs, training images and the estimate of each, and the
saving of each cut against `full`.

    python benchmarks/budget.py --data ../shared/defungi
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from defungi.config import load_config
from defungi.experiments.meter import Probe, step_plan
from defungi.experiments.protocols import dataset_for, plan_fits
from defungi.experiments.studies import final_folds, plan_study
from defungi.jobs import TRANSFER_PROFILE, study_names, transfer_overrides
from defungi.results.plan import StepPlan
from defungi.utils import clock, cpu_flags

# each cut of quick against full: (config keys, study options)
CUTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "random final CV on 1 of 3 folds": ({}, {"study.random_folds": 1}),
    "grouped final fits 5 epochs, patience 2": (
        {"train.epochs": 5, "train.patience_epochs": 2},
        {"study.random_config": {"train.epochs": 20, "train.patience_epochs": 6}},  # the random CV keeps full's
    ),
    "explorations of 2 epochs": ({}, {"study.epochs": 2, "study.convmixer.epochs": 2}),
    "smaller grids": (
        {},
        {
            "study.grid_batch_sizes": [32, 64],
            "study.grid_lrs": [1e-3, 2e-3, 4e-3],
            "study.resnet34.grid2_lr_factors": [1.0, 2.0],
            "study.convmixer.grid_lrs": [2e-3, 4e-3],
        },
    ),
    "ConvMixer: 2 split ratios once, depths 8 and 16": (
        {},
        {
            "study.convmixer.split_ratios": [0.75, 0.9],
            "study.convmixer.split_repeats": 1,
            "study.convmixer.depths": [8, 16],
            "study.convmixer.depth_lr_factors": [1.0],
        },
    ),
    "ResNet-34 curves on the full data: 1 epoch, 2 sizes": (
        {},
        {"study.curve_fractions": [0.25, 0.5, 1.0], "study.resnet34.full_curve_epochs": 1},
    ),
}


def job(profile: str, data_root: str, probe: Probe, changes: dict[str, Any], study: dict[str, Any]) -> list[StepPlan]:
    """The main job's steps under profile with changes (config keys) and study options, planned into a
    scratch folder."""
    config = load_config(profile, {"data.root": data_root, **changes})
    dataset = dataset_for(config, progress=False)
    out = Path(tempfile.mkdtemp(prefix="defungi-budget-"))
    steps = [p for n in study_names() for p in plan_study(n, config, out / n, probe, study, dataset, profile)]
    folds = final_folds(study_names()[0], config, study, profile)
    transfer = load_config(TRANSFER_PROFILE, transfer_overrides(config, folds))
    steps.append(step_plan("transfer", "transfer", plan_fits(transfer, dataset_for(transfer, progress=False)), probe))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/defungi")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    probe = Probe()
    rows = {"full": job("full", args.data, probe, {}, {})}
    rows |= {f"full, {name}": job("full", args.data, probe, *cut) for name, cut in CUTS.items()}
    rows["quick"] = job("quick", args.data, probe, {}, {})
    print(f"CPU flags: {cpu_flags()}")
    for rate in probe.rates.values():
        print(f"  {rate.model} ({rate.precision}): trains {rate.train_images_per_s:.0f} img/s")
    full = sum(s.estimate_seconds for s in rows["full"])
    print(f"{'plan':<62} {'fits':>5} {'epochs':>6} {'images':>10} {'estimate':>9} {'saves':>9} {'of full':>7}")
    for name, steps in rows.items():
        total = sum(s.estimate_seconds for s in steps)
        fits, epochs, images = (sum(getattr(s, k) for s in steps) for k in ("fits", "epochs", "images"))
        print(
            f"{name:<62} {fits:>5} {epochs:>6} {images:>10,} {clock(total):>9} {clock(full - total):>9} "
            f"{total / full:>7.1%}"
        )


if __name__ == "__main__":
    main()
