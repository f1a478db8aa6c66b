"""The arithmetic of refusing what is not a micrograph: the distances' fit, the thresholds, the tiers.

A refusal score (train.ood reads the model and scores each image inside the forward pass that
classifies it) is a Mahalanobis distance to the nearest training class mean, under one within-class
covariance shrunk by Ledoit-Wolf (Lee et al. 2018): `whitening` fits the projection and the means
that make it a Euclidean distance. Its scale and threshold are the ceil((n + 1) q)-th smallest of n
held-out values (`refusal_threshold`), so that a new micrograph exchangeable with them lies over it
with probability at most 1 - q; with fewer than q / (1 - q) of them (`held_out_needed`) no threshold
keeps that promise. A score over REFUSE is refused as not a fungus micrograph, over 1 and up to
REFUSE answered and flagged unlike the training specimens (a micrograph of another stain,
microscope or focus lands there; `refusal_tiers`).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
from sklearn.covariance import empirical_covariance, ledoit_wolf_shrinkage, shrunk_covariance

QUANTILE = 0.99  # held-out micrographs under their threshold (a score of 1): about 1% of micrographs flagged

# Images whose refusal score is over REFUSE are refused. Measured by benchmarks/refusal_tiers.py on a
# transfer CV of ../shared/defungi (docs/history/measurements.md, "Refusals a lab can live with"): 3 of 7,897
# out-of-fold micrographs score over 1.5 (93 over 1); of 900 real micrographs made yellower, bluer, paler,
# darker or blurred, 1 (at 1.72); noise, gradients and text all (3.8 and over), 59 of 60 photographs.
REFUSE = 1.5


def whitening(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Of rows x (rows x features) and their classes: the projection that whitens the shared
    within-class covariance (features x features) and the class means projected (classes x features),
    both float32; a row's distance to class c is |x @ projection - means[c]|."""
    classes, index = np.unique(labels, return_inverse=True)
    means = np.stack([x[index == c].mean(0, dtype=np.float64) for c in range(len(classes))])
    # Ledoit-Wolf's products over the training rows in float32, the readings' own precision (the
    # estimator object would cast them to float64, at twice the time), in one block of all the features
    # (sklearn's blocks of 1000 multiply strided slices: 0.37 s against 0.075 s for 4,089 x 1,280)
    centred = (x - means[index]).astype(np.float32)
    shrinkage = ledoit_wolf_shrinkage(centred, assume_centered=True, block_size=max(1, centred.shape[1]))
    covariance = shrunk_covariance(empirical_covariance(centred, assume_centered=True), shrinkage).astype(np.float64)
    covariance[np.diag_indices_from(covariance)] += covariance.diagonal().max() * 1e-9  # dead units stay finite
    # covariance = L @ L.T, so x @ inv(L).T whitens: a Cholesky factor costs a tenth of an eigendecomposition
    lower = scipy.linalg.cholesky(covariance, lower=True)
    projection = scipy.linalg.solve_triangular(lower, np.eye(len(lower)), lower=True).T
    return projection.astype(np.float32), (means @ projection).astype(np.float32)


def refusal_threshold(values: np.ndarray, quantile: float) -> float:
    """The ceil((n + 1) quantile)-th smallest of n values (see held_out_needed for how many it takes)."""
    k = math.ceil((len(values) + 1) * quantile - 1e-9)
    if k > len(values):
        raise ValueError(f"{len(values)} held-out values are too few for the quantile {quantile}")
    return float(np.sort(values)[k - 1])


def held_out_needed(quantile: float = QUANTILE) -> int:
    """The fewest held-out micrographs that can set a threshold at quantile (99 at 0.99)."""
    return math.ceil(quantile / (1 - quantile) - 1e-9)


def refusal_tiers(scores: np.ndarray, refuse_over: float = REFUSE) -> tuple[np.ndarray, np.ndarray]:
    """Per image, whether it is refused as not a fungus micrograph (its score over refuse_over) and
    whether it is answered but flagged unlike the training specimens (over 1, up to refuse_over)."""
    return scores > refuse_over, (scores > 1) & (scores <= refuse_over)


def refused_share(
    refused: np.ndarray, specimens: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, list[float]]:
    """The share of images refused and its 95% interval from a bootstrap over specimens."""
    ids, index = np.unique(specimens, return_inverse=True)
    hits, sizes = np.bincount(index, weights=refused.astype(float)), np.bincount(index)
    draws = np.random.default_rng(seed).integers(0, len(ids), (n_boot, len(ids)))
    shares = hits[draws].sum(1) / sizes[draws].sum(1)
    return float(refused.mean()), [float(np.percentile(shares, 2.5)), float(np.percentile(shares, 97.5))]
