"""Probability averaging across finished runs of different models, scored out of fold (issue #23, item 2).

Every run must be a cross-validation of the same images on the same folds (the README's grouped folds:
`--cv 3` with the default seed), so that each image's probabilities in every run come from models that
never saw its specimen, and their mean is an out-of-fold blend. For each run alone and for every blend
of two or more runs (their mean probability per image), prints the macro-F1 and accuracy per image and
per specimen (a specimen's images pooled by the first run's specimen rule) with 95% intervals from the
bootstrap over specimens, and the paired difference to the first run (the paired bootstrap of
`report --compare`).

    python benchmarks/blend_runs.py runs/main/transfer runs/pair-cv \
        runs/main/study-convmixer/07-final/grouped runs/main/study-resnet34/07-final/grouped
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from defungi.experiments.compare import Scored, scored_images
from defungi.layout import RunLayout, read_table
from defungi.stats.metrics import bootstrap_difference, bootstrap_intervals, classification_metrics, specimen_decisions
from defungi.utils import cpu_flags


def folds_of(run: Path) -> list[str]:
    """The fold of each out-of-fold image of a cross-validated run, by path."""
    rows = sorted(read_table(RunLayout(run).oof, ("path", "fold")), key=lambda r: r["path"])
    return [r["fold"] for r in rows]


def rows(
    name: str, width: int, scored: Scored, probs: np.ndarray, first: np.ndarray, first_specimens: np.ndarray
) -> list[str]:
    """Table rows (per image, per specimen) of one recipe's probabilities against the first run's."""
    n = len(scored.classes)
    out = []
    ids, labels, pooled = specimen_decisions(probs, scored.labels, scored.specimens, scored.rule)
    units = {
        "image": (scored.labels, probs.argmax(1), first, scored.specimens),
        "specimen": (labels, pooled.argmax(1), first_specimens, ids),
    }
    for unit, (y, predicted, baseline, specimens) in units.items():
        point = classification_metrics(y, predicted, [str(c) for c in range(n)])
        interval = bootstrap_intervals(y, predicted, specimens, n)
        paired = bootstrap_difference(y, baseline, predicted, specimens, n)
        cells = [f"{point[m]:.3f} [{interval[m][0]:.3f}, {interval[m][1]:.3f}]" for m in ("f1", "accuracy")]
        d = paired["f1"]
        cells.append(f"{100 * d['difference']:+.1f} [{100 * d['interval'][0]:+.1f}, {100 * d['interval'][1]:+.1f}]")
        out.append(f"{name:{width}s} {unit:9s} " + " ".join(f"{c:>22s}" for c in cells))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished --cv runs on the same images and folds")
    args = parser.parse_args()
    t0 = time.perf_counter()
    scored = [scored_images(r) for r in args.runs]
    folds = [folds_of(r) for r in args.runs]
    for run, s, f in zip(args.runs[1:], scored[1:], folds[1:], strict=True):
        if s.paths != scored[0].paths or f != folds[0] or s.classes != scored[0].classes:
            raise SystemExit(f"{run}: not the images, folds or classes of {args.runs[0]}; blend runs of one CV")
    base = scored[0]
    first = base.probs.argmax(1)
    first_specimens = specimen_decisions(base.probs, base.labels, base.specimens, base.rule)[2].argmax(1)
    specimens, flags = len(np.unique(base.specimens)), cpu_flags() or "none (AVX2 only)"
    print(f"{len(base.paths)} out-of-fold images, {specimens} specimens; CPU flags: {flags}")
    names = [r.name if r.name not in ("grouped", "random") else f"{r.parent.parent.name}/{r.name}" for r in args.runs]
    recipes = [
        combo for k in range(1, len(args.runs) + 1) for combo in itertools.combinations(range(len(args.runs)), k)
    ]
    labels = [" + ".join(names[i] for i in combo) for combo in recipes]
    width = max(len(label) for label in labels)
    print(f"{'recipe':{width}s} {'unit':9s} {'macro-F1':>22s} {'accuracy':>22s} {'F1 - first (points)':>22s}")
    for combo, label in zip(recipes, labels, strict=True):
        probs = np.mean([scored[i].probs for i in combo], axis=0)
        print("\n".join(rows(label, width, base, probs, first, first_specimens)))
    print(f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
