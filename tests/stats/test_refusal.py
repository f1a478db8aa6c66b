"""The refusal score's arithmetic on small random arrays: the whitening against a hand computation, the
thresholds at their conformal rank and what they promise, the tiers' edges, the shares over specimens."""

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from defungi.stats.refusal import (
    REFUSE,
    held_out_needed,
    refusal_threshold,
    refusal_tiers,
    refused_share,
    whitening,
)


def test_whitening_makes_the_distance_mahalanobis_to_each_class_mean_under_the_shrunk_covariance():
    rng = np.random.default_rng(0)
    labels = rng.choice([1, 4, 7], 240)  # classes need not be 0..k-1: the means come in sorted order
    mixing = rng.normal(0, 1, (6, 6))
    x = (rng.normal(0, 1, (240, 6)) @ mixing + 2.0 * labels[:, None]).astype(np.float32)
    projection, means = whitening(x, labels)
    assert projection.dtype == means.dtype == np.float32 and projection.shape == (6, 6) and means.shape == (3, 6)
    centres = np.stack([x[labels == c].mean(0, dtype=np.float64) for c in (1, 4, 7)])
    covariance = LedoitWolf(assume_centered=True).fit(x - centres[np.searchsorted([1, 4, 7], labels)]).covariance_
    assert np.allclose(projection.T @ covariance @ projection, np.eye(6), atol=1e-4)  # it whitens
    new = rng.normal(0, 3, (10, 6))
    diffs = new[:, None, :] - centres[None]
    by_hand = np.sqrt(np.einsum("ncd,de,nce->nc", diffs, np.linalg.inv(covariance), diffs))
    whitened = np.linalg.norm((new @ projection)[:, None, :] - means[None], axis=-1)
    assert np.allclose(whitened, by_hand, rtol=1e-4)


def test_the_threshold_is_the_conformal_rank_of_the_held_out_values():
    values = np.arange(1.0, 201.0)  # 1..200
    assert refusal_threshold(values, 0.99) == 199.0  # ceil(201 * 0.99) = 199th smallest
    assert refusal_threshold(np.random.default_rng(1).permutation(values), 0.9) == 181.0  # ceil(180.9), unsorted
    assert held_out_needed(0.99) == 99 and held_out_needed(0.98) == 49 and held_out_needed(0.9) == 9
    assert refusal_threshold(values[:99], 0.99) == 99.0  # just enough: the largest
    for quantile in (0.9, 0.98, 0.99):
        with pytest.raises(ValueError, match="too few"):
            refusal_threshold(values[: held_out_needed(quantile) - 1], quantile)


def test_a_new_value_exchangeable_with_the_held_out_lies_over_the_threshold_at_most_one_time_in_ten():
    """120 uniform held-out values at 0.9: the 109th smallest, over which a new value lies with
    probability 12/121 on average (one rank lower would give 13/121, over the promised 0.1)."""
    rng = np.random.default_rng(2)
    over = [1 - refusal_threshold(rng.uniform(size=120), 0.9) for _ in range(4000)]
    assert np.mean(over) <= 0.1 and abs(np.mean(over) - 12 / 121) < 0.002


def test_the_tiers_refuse_over_refuse_and_flag_over_one_up_to_it():
    scores = np.array([0.3, 1.0, 1.0001, REFUSE, REFUSE + 1e-4, 7.0])
    refused, flagged = refusal_tiers(scores)
    assert refused.tolist() == [False, False, False, False, True, True]
    assert flagged.tolist() == [False, False, True, True, False, False]
    refused, flagged = refusal_tiers(scores, refuse_over=1.0)  # before the tiers: everything over 1 refused
    assert refused.tolist() == [False, False, True, True, True, True] and not flagged.any()


def test_refused_share_and_its_interval_over_specimens():
    refused = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    specimens = np.array(["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"])
    share, (low, high) = refused_share(refused, specimens)
    assert share == 0.2 and low == 0.0 and high >= 0.4  # one specimen in five holds both refusals
    # every specimen refuses one of its two images: specimens drawn in any mix give a half (images would not)
    share, interval = refused_share(np.tile([True, False], 5), specimens)
    assert share == 0.5 and interval == [0.5, 0.5]
