"""Near-blank fields: what a focus or texture criterion beside the variance threshold would exclude, out
of fold, and whether excluding it helps. For each criterion (the variance of the Laplacian, the mean
gradient energy, the grey variance itself; each on the 224 px grey image) and each share of the
lowest-scoring usable images (0.5, 1, 2%): the images excluded, their out-of-fold accuracy and mean
confidence, the specimens left with no image, and the specimen accuracy's paired change (each
specimen decided by the mean of its remaining images) with a 95% bootstrap interval over specimens.

    python benchmarks/near_blank.py RUN
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from defungi.layout import RunLayout, read_table


def laplacian(grey: np.ndarray) -> float:
    return float(ndimage.laplace(grey).var())


def gradient_energy(grey: np.ndarray) -> float:
    gy, gx = np.gradient(grey)
    return float(np.mean(gx**2 + gy**2))


CRITERIA: dict[str, Callable[[np.ndarray], float]] = {
    "variance of the Laplacian": laplacian,
    "gradient energy": gradient_energy,
    "grey variance": lambda grey: float(grey.var()),
}


def specimen_right(probs: np.ndarray, labels: np.ndarray, specimens: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per specimen: 1 if the mean of its kept images' probabilities picks its class, 0 if not, -1 if
    none of its images is kept."""
    out = []
    for g in np.unique(specimens):
        rows = (specimens == g) & keep
        out.append(int(probs[rows].mean(0).argmax() == labels[specimens == g][0]) if rows.any() else -1)
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    rows = read_table(RunLayout(args.run).oof)
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    labels = np.array([classes.index(r["class"]) for r in rows])
    specimens = np.array([r["sample"] for r in rows])
    greys = [np.asarray(Image.open(r["path"]).convert("L").resize((224, 224)), dtype=np.float32) for r in rows]
    right = probs.argmax(1) == labels
    base = specimen_right(probs, labels, specimens, np.ones(len(rows), bool))
    print(f"{len(rows)} out-of-fold images of {len(base)} specimens; image accuracy {right.mean():.3f}, "
          f"specimen accuracy {base.mean():.3f}")  # fmt: skip
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(base), (1000, len(base)))
    for name, criterion in CRITERIA.items():
        values = np.array([criterion(g) for g in greys])
        for share in (0.005, 0.01, 0.02):
            keep = values >= np.quantile(values, share)
            after = specimen_right(probs, labels, specimens, keep)
            lost = after < 0
            change = np.where(lost, 0, after - base)  # a specimen left with no image: no answer, counted as before
            low, high = np.percentile(change[draws].mean(1), [2.5, 97.5])
            print(
                f"{name:<26} lowest {share:>4.1%}: {np.sum(~keep):>3} images excluded, "
                f"right on {right[~keep].mean():.3f} (mean confidence {probs[~keep].max(1).mean():.3f}); "
                f"{lost.sum()} specimens left with no image; "
                f"specimen accuracy {change.mean():+.4f} [{low:+.4f}, {high:+.4f}] paired"
            )


if __name__ == "__main__":
    main()
