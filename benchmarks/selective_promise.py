"""Selective answers' promises against what they deliver on specimens they were not chosen on, from the
out-of-fold predictions of finished cross-validations (oof.csv): for each target accuracy and each
fold, the threshold chosen on the other folds' specimens, then the share of this fold's specimens it
answers and their accuracy. Before: the lowest confidence whose answered share reached the target on
the curve (the point estimate answers used until issue 34). After: Learn-then-Test (stats.selective).

    python benchmarks/selective_promise.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from defungi.stats.metrics import temper
from defungi.stats.selective import TARGETS, risk_coverage, threshold_at
from defungi.train.assess import Held, assess, by_specimen


def on_the_curve(confidence: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """Before: the lowest threshold whose answered units reached target on the curve itself."""
    cut, _, accuracy = risk_coverage(confidence, correct)
    reached = np.flatnonzero(accuracy >= target)
    return float(cut[reached[-1]]) if len(reached) else None


def specimens(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated confidence, correctness and fold of each out-of-fold specimen, as the run pools them."""
    with open(run / "oof.csv") as fh:
        rows = list(csv.DictReader(fh))
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    labels = np.array([classes.index(r["class"]) for r in rows])
    ids, fold = np.array([r["sample"] for r in rows]), np.array([int(r["fold"]) for r in rows])
    trust = assess(probs, labels, ids, fold, classes, "out of fold")
    pooled = by_specimen(Held(probs, labels, ids, fold))
    calibrated = temper(pooled.probs, trust.temperatures["specimen"].applied)
    return calibrated.max(1), calibrated.argmax(1) == pooled.labels, pooled.fold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print(
        f"{'run':<16} {'target':>6} {'procedure':<16} {'all folds: t, share':<22} per held-out fold: answered, accuracy"
    )
    short = {"before": 0, "after": 0}
    checks = {"before": 0, "after": 0}
    for run in args.runs:
        confidence, correct, fold = specimens(run)
        for target in TARGETS:
            for name, choose in (("before", on_the_curve), ("after", threshold_at)):
                t_all = choose(confidence, correct, target)
                whole = "none" if t_all is None else f"{t_all:.3f}, {np.mean(confidence >= t_all):.0%}"
                cells = []
                for k in np.unique(fold):
                    fit, held = fold != k, fold == k
                    t = choose(confidence[fit], correct[fit], target)
                    answered = confidence[held] >= t if t is not None else np.zeros(held.sum(), bool)
                    if not answered.any():
                        cells.append(f"{k + 1}: none")
                        continue
                    accuracy = correct[held][answered].mean()
                    checks[name] += 1
                    short[name] += accuracy < target
                    cells.append(
                        f"{k + 1}: {answered.sum()}/{held.sum()} {accuracy:.3f}{' <' if accuracy < target else ''}"
                    )
                label = {"before": "on the curve", "after": "Learn-then-Test"}[name]
                print(f"{run.name:<16} {target:>6.2f} {label:<16} {whole:<22} {' | '.join(cells)}")
    for name in ("before", "after"):
        print(f"{name}: {short[name]} of {checks[name]} fold checks answered below their target ('<')")


if __name__ == "__main__":
    main()
