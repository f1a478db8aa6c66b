import numpy as np
import pytest

from defungi.results.schema import from_dict, to_dict
from defungi.results.trust import Trust
from defungi.stats.metrics import calibration, temper
from defungi.train.assess import assess

CLASSES = ["H1", "H2", "H3", "H5", "H6"]


def _held_out(seed: int, n_specimens: int = 300, images: int = 4, sharpness: float = 1.5, power: float = 1.0):
    """Images of specimens; each specimen's images share its (calibrated) class probabilities, with
    noise; power > 1 makes the reported probabilities over-confident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, sharpness, (n_specimens, 5))
    truth = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=p) for p in truth])
    probs = np.repeat(truth, images, 0) * rng.uniform(0.8, 1.2, (n_specimens * images, 5))
    probs = temper(probs / probs.sum(1, keepdims=True), 1 / power)
    specimens = np.repeat([f"s{i}" for i in range(n_specimens)], images)
    return probs, np.repeat(labels, images), specimens, np.repeat(np.arange(n_specimens) % 3, images)


def test_a_temperature_is_kept_only_where_it_helps_on_units_it_was_not_fitted_on():
    over = assess(*_held_out(0, power=2.5), CLASSES, "out of fold")
    image = over.temperatures["image"]
    assert image.temperature > 1.5 and image.kept and image.ece_after < image.ece_before
    assert image.fitted_on == "the other folds" and image.checked_on == "each fold"
    fine = assess(*_held_out(1), CLASSES, "out of fold")
    assert 0.7 < fine.temperatures["image"].temperature < 1.4  # nothing much to correct
    for t in fine.temperatures.values():
        assert t.kept == (t.nll_after < t.nll_before and t.ece_after < t.ece_before)


def test_sets_cover_held_out_specimens_at_their_level_and_the_record_round_trips():
    probs, labels, specimens, fold = _held_out(2)
    trust = assess(probs, labels, specimens, fold, CLASSES, "out of fold")
    for level in (0.9, 0.95):
        for unit in ("specimen", "image"):
            sets = trust.conformal(level, unit)
            check = sets.checked[sets.mode]
            assert check.coverage_interval[0] <= level + 0.01 and check.coverage > level - 0.05
            assert 1 <= check.mean_size <= 5 and sets.calibration_units == 300
    assert from_dict(Trust, to_dict(trust)) == trust
    with pytest.raises(KeyError, match="no image sets at 0.8"):
        trust.conformal(0.8, "image")


def test_selective_answers_are_more_accurate_on_the_most_confident_specimens():
    trust = assess(*_held_out(3), CLASSES, "out of fold")
    table = {row.coverage: row for row in trust.selective.table}
    assert table[0.5].accuracy > table[1.0].accuracy
    assert all(r.interval[0] <= r.accuracy <= r.interval[1] for r in table.values())


def test_selective_promises_are_chosen_on_every_specimen_and_checked_on_each_fold():
    trust = assess(*_held_out(5, n_specimens=600, sharpness=4.0), CLASSES, "out of fold")
    promises = {p.target: p for p in trust.selective.promises}
    assert {0.8, 0.85, 0.9} <= set(promises) and trust.selective.units == 600
    for p in promises.values():
        assert p.accuracy >= p.target and p.share_interval[0] < p.share < p.share_interval[1]
        assert [c.fold for c in p.checked] == [1, 2, 3] and sum(c.units for c in p.checked) == 600
        for c in p.checked:  # what a threshold fitted on two folds delivers on the third
            assert c.threshold is None or (c.accuracy is not None and c.accuracy > p.target - 0.05)
    assert all(c.threshold is not None for c in promises[0.8].checked)
    assert from_dict(Trust, to_dict(trust)) == trust


def test_one_split_fits_on_validation_and_checks_on_test():
    probs, labels, specimens, fold = _held_out(4, power=2.0)
    fold = np.where(fold == 0, -1, 0)  # a third of the specimens validate, the rest test
    trust = assess(probs, labels, specimens, fold, CLASSES, "validation + test")
    image = trust.temperatures["image"]
    assert image.fitted_on == "the validation part" and image.checked_on == "the test part"
    assert trust.conformal(0.9, "specimen").calibration_units == 100
    assert calibration(temper(probs, image.temperature), labels)["ece"] < calibration(probs, labels)["ece"]
