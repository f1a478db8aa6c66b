"""The refusal detector on readings whose distribution is known: what it refuses, how often it
refuses what it should answer, and how it reads a model (and an ensemble's members) inside a forward pass."""

import numpy as np
import torch
import torch.nn as nn
from sklearn.covariance import LedoitWolf

from defungi.models.ensemble import Ensemble
from defungi.train.ood import OodHooks, Reading, fit_detector

HEAD = Reading("head", "input")
BODY = Reading("body", "channel means")


def _clusters(
    rng: np.random.Generator, n: int, dim: int = 16, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Three classes (labels, or drawn): Gaussian clouds with a shared, correlated covariance around
    distinct means."""
    mixing = np.random.default_rng(7 + dim).normal(0, 1, (dim, dim)) / np.sqrt(dim)
    means = np.random.default_rng(8 + dim).normal(0, 3, (3, dim))
    labels = rng.integers(0, 3, n) if labels is None else labels
    return means[labels] + rng.normal(0, 1, (n, dim)) @ mixing, labels


def test_the_distance_is_mahalanobis_to_the_nearest_class_mean_under_the_shared_shrunk_covariance():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 400)
    detector = fit_detector([x], y, [_clusters(rng, 100)[0]], [HEAD])
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(x - means[y]).covariance_)
    new = _clusters(rng, 20)[0] * 1.5
    diffs = new[:, None, :] - means[None]
    expected = np.sqrt(np.einsum("ncd,de,nce->nc", diffs, precision, diffs).min(1))
    scale = detector.distances[0].scale * detector.threshold
    assert np.allclose(detector.scores([new]) * scale, expected, rtol=1e-3)


def test_it_refuses_about_one_in_a_hundred_new_micrographs_and_what_is_far_in_any_reading():
    rng = np.random.default_rng(1)
    x, y = _clusters(rng, 2000)
    low, _ = _clusters(rng, 2000, dim=4, labels=y)  # two readings of the same images
    held, held_y = _clusters(rng, 500)
    detector = fit_detector([x, low], y, [held, _clusters(rng, 500, 4, held_y)[0]], [BODY, HEAD], quantile=0.99)
    new, new_y = _clusters(rng, 20_000)
    new = [new, _clusters(rng, 20_000, 4, new_y)[0]]
    assert np.mean(detector.scores(new) > 1) <= 0.02  # images it should answer: refused about 1%
    usual, usual_y = _clusters(rng, 200)
    usual_low = _clusters(rng, 200, 4, usual_y)[0]
    far = usual + rng.normal(0, 6, (200, 16))  # the same means, features scattered far off
    assert np.mean(detector.scores([usual, usual_low]) > 1) <= 0.05
    assert np.all(detector.scores([far, usual_low]) > 1)  # far in one reading is enough
    assert np.all(detector.scores([usual, usual_low * 4]) > 1)


def test_too_few_held_out_micrographs_fit_no_detector():
    x, y = _clusters(np.random.default_rng(3), 300)
    assert fit_detector([x], y, [x[:98]], [HEAD]) is None  # too few to keep the promise at 0.99 (99)


class _Net(nn.Module):
    """A body (a 4-D map), pooled, then a head: the head's input is the body's channel means plus a shift."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.body = nn.Identity()
        self.head = nn.Linear(3, 2)
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)) + self.shift)


def test_hooks_read_each_member_and_average_their_scores_on_the_first_view_of_each_image():
    rng = np.random.default_rng(2)
    members = [_Net(0.0), _Net(0.5)]
    model = Ensemble(members)
    train, held = rng.normal(0, 1, (300, 3)), rng.normal(0, 1, (120, 3))
    labels = np.zeros(300, int)
    detectors = [fit_detector([train, train + m.shift], labels, [held, held + m.shift], [BODY, HEAD]) for m in members]
    hooks = OodHooks(model, detectors)
    x = torch.from_numpy(rng.normal(0, 3, (4, 3, 8, 8)).astype(np.float32))
    with torch.no_grad(), hooks:
        for batch in (x[:2], x[2:]):  # batch by batch, each image as it is, then another view (as under TTA)
            model(batch)
            model(batch + 5)  # a view that scores far higher: it must not count
    pooled = x.mean((2, 3)).numpy()
    expected = [d.scores([pooled, pooled + m.shift]) for d, m in zip(detectors, members, strict=True)]
    assert np.allclose(hooks.images(views=2).numpy(), np.mean(expected, axis=0), rtol=1e-5)
    model(x)  # outside the block no hook is left behind
    assert len(hooks.calls) == 8
