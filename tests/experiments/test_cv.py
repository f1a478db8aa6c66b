import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from defungi.cli import main
from defungi.data.dataset import load_dataset
from defungi.errors import DefungiError
from defungi.experiments import fit as fit_module
from defungi.experiments.compare import paired_difference, scored_images
from defungi.experiments.protocols import cv_splits, fit_run, fold_processes
from defungi.stats.metrics import specimen_decisions
from defungi.train.checkpoint import load_trained
from defungi.train.frozen import FrozenPass
from tests.conftest import tiny_args, tiny_config, write_folder
from tests.experiments.test_fit import FROZEN
from tests.experiments.test_fit import _config as frozen_config


def _config(data: Path, **over):
    return tiny_config(data, {"train.tta": False, "data.cv_folds": 3, **over})


def test_folds_keep_samples_whole_and_validate_on_other_samples(tiny_data: Path):
    config = _config(tiny_data)
    data = load_dataset(tiny_data, 16, 15.0, progress=False)
    splits = cv_splits(config, data)
    tests = np.concatenate([s["test"] for s in splits])
    assert sorted(tests) == list(range(len(data.labels)))  # every usable image in exactly one test part
    for s in splits:
        specimens = {part: set(data.specimens[idx]) for part, idx in s.items()}
        assert (
            not specimens["train"] & specimens["test"]
            and not specimens["val"] & specimens["test"]
            and not specimens["train"] & specimens["val"]
        )


def test_cv_run_scores_every_image_once_out_of_fold_and_resumes(tiny_data: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "cv"
    record = fit_run(_config(tiny_data), out)
    with open(out / "oof.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    usable = load_dataset(tiny_data, 16, 15.0, progress=False)
    assert sorted(r["path"] for r in rows) == sorted(map(str, usable.paths))
    assert {r["fold"] for r in rows} == {"0", "1", "2"}
    for k in range(3):  # an image's fold model never trained on its sample
        split = {r["path"]: r["part"] for r in csv.DictReader(open(out / f"fold-{k}" / "split.csv", newline=""))}
        fold_rows = [r for r in rows if r["fold"] == str(k)]
        assert all(split[r["path"]] == "test" for r in fold_rows)
        trained_samples = {r["sample"] for r in rows if split[r["path"]] == "train"}
        assert not trained_samples & {r["sample"] for r in fold_rows}
    test = record.metrics.part("test")
    assert test.n == len(rows) and test.samples.n == len({r["sample"] for r in rows})
    for level in (test, test.samples):
        low, high = level.interval("f1")
        assert 0 <= low <= high <= 1
    assert record.metrics.kind == "cv" and record.metrics.reported_name == "out of fold"
    assert len(record.metrics.folds) == 3 and len(record.metrics.best_epochs) == 3 and test.calibration.ece >= 0
    # killed in the third fold: the next call trains only that fold
    (out / "metrics.json").unlink()
    stamps = [(out / f"fold-{k}" / "best.pt").stat().st_mtime_ns for k in range(2)]
    import shutil

    shutil.rmtree(out / "fold-2")
    calls = []
    real = fit_module.train_one_epoch
    monkeypatch.setattr(fit_module, "train_one_epoch", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = fit_run(_config(tiny_data), out)
    assert len(calls) == 2  # two epochs of one fold
    assert [(out / f"fold-{k}" / "best.pt").stat().st_mtime_ns for k in range(2)] == stamps
    assert again.metrics.part("test").f1 == pytest.approx(test.f1)


def test_evaluate_and_predict_take_a_cv_run_as_the_ensemble_of_its_folds(tiny_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "cv"
    fit_run(_config(tiny_data), out)
    trained = load_trained(out)
    assert trained.info["members"] == 3
    unseen = write_folder(tmp_path / "unseen", samples_per_class=2, patches=2, seed=7)
    assert main(["evaluate", str(out), "--data", str(unseen), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["scores"]["n"] == 12 and metrics["scores"]["samples"]["n"] == 6
    assert main(["predict", str(out), str(unseen / "H1"), "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5  # 2 samples x 2 patches and the blank field


def test_cv_with_too_few_samples_is_one_line(tmp_path: Path, capsys):
    data = write_folder(tmp_path / "d", samples_per_class=2, patches=2)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--cv", "3", "--image-size", "16"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("defungi: error: class H1 has 2 samples; 3-fold") and "\n" not in err
    with pytest.raises(DefungiError, match="data.cv_folds"):
        _config(data, **{"data.cv_folds": 1})


def test_grouped_and_random_cv_side_by_side(tiny_data: Path, tmp_path: Path, capsys):
    for split in ("grouped", "random"):
        argv = ["train", "--data", str(tiny_data), "--out", str(tmp_path / split), "--cv", "3", "--split", split]
        assert main([*argv, *tiny_args({"train.tta": False})]) == 0
    out = capsys.readouterr().out
    assert "3-fold cross-validation, out of fold, per specimen" in out and "F1 0." in out
    names = ("folds.png", "reliability_test.png", "confusion_test.png", "confusion_test_samples.png")
    for name in (*names, "confident_errors.png"):
        assert (tmp_path / "grouped" / name).exists(), name
    page = (tmp_path / "grouped" / "report.md").read_text()  # folds counted 1..3 on the page, as in folds.png
    assert all(f"fold {k}: " in page for k in (1, 2, 3)) and "fold 0" not in page
    assert (
        main(
            ["report", "--compare", str(tmp_path / "grouped"), str(tmp_path / "random"), "--out", str(tmp_path / "cmp")]
        )
        == 0
    )
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "grouped 3-fold CV), per specimen |" in md and "random 3-fold CV), per image |" in md
    assert re.search(r"\| f1, per specimen \| [+-]\d+\.\d \| \[[+-]\d+\.\d, [+-]\d+\.\d\] \| (yes|no)", md)


def test_runs_on_different_images_are_not_compared(tiny_data: Path, tmp_path: Path):
    for name, seed in (("a", 0), ("b", 1)):
        fit_run(_config(tiny_data, **{"data.cv_folds": 0, "data.seed": seed}), tmp_path / name)
    with pytest.raises(DefungiError, match="scored different images"):
        paired_difference(tmp_path / "a", tmp_path / "b")


def test_a_cv_run_decides_its_specimens_by_its_rule_and_compare_reads_each_runs(tiny_data: Path, tmp_path: Path):
    """train.specimen_rule = log_mean: the out-of-fold specimen scores and metrics.json's sample_rule are
    the geometric mean's; report --compare pools each run by its own rule (two copies of the run, one
    read as a mean-rule run, on the same spread-out probabilities, where the rules disagree)."""
    out = tmp_path / "log-mean"
    record = fit_run(_config(tiny_data, **{"train.specimen_rule": "log_mean"}), out)
    scored = scored_images(out)
    ids, labels, pooled = specimen_decisions(scored.probs, scored.labels, scored.specimens, "log_mean")
    assert record.metrics.part("test").samples.accuracy == pytest.approx(np.mean(pooled.argmax(1) == labels))
    assert "geometric mean" in record.metrics.sample_rule
    rows = list(csv.DictReader(open(out / "oof.csv", newline="")))
    probs = np.random.default_rng(0).dirichlet(np.full(len(scored.classes), 0.3), size=len(rows))
    for row, p in zip(rows, probs, strict=True):
        row |= {f"p_{c}": f"{v:.6f}" for c, v in zip(scored.classes, p, strict=True)}
    with open(out / "oof.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    as_mean = Path(shutil.copytree(out, tmp_path / "mean"))
    config = json.loads((as_mean / "config.json").read_text())
    config["train"]["specimen_rule"] = "mean"
    (as_mean / "config.json").write_text(json.dumps(config))
    spread = scored_images(out)
    right = {
        rule: np.mean(specimen_decisions(spread.probs, spread.labels, spread.specimens, rule)[2].argmax(1) == labels)
        for rule in ("mean", "log_mean")
    }
    assert right["log_mean"] != right["mean"]
    difference = paired_difference(as_mean, out).samples["accuracy"].difference
    assert difference == pytest.approx(right["log_mean"] - right["mean"])


def _frozen_cv(data: Path, weights: Path, **over: object):
    return frozen_config(data, weights, **{**FROZEN, "data.cv_folds": 3, **over})


def _pids(monkeypatch, owner: object, name: str, log: Path) -> None:
    """The id of each process that calls owner.name appended to log (forked processes inherit the patch)."""
    real = getattr(owner, name)

    def logged(*args, **kwargs):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, logged)


@pytest.mark.parametrize("over", [{}, {"train.train_from": "blocks.1", "train.cached_views": 2}])
def test_frozen_folds_fit_side_by_side_as_they_do_one_after_the_other(
    tiny_data: Path, weights: Path, tmp_path: Path, monkeypatch, over
):
    config, here = _frozen_cv(tiny_data, weights, **over), str(os.getpid())
    answers = {}
    for threads, out in (("2", "side-by-side"), ("1", "one-by-one")):  # the first passes the images
        monkeypatch.setenv("DEFUNGI_THREADS", threads)
        fitted, passed = tmp_path / f"{out}.fitted", tmp_path / f"{out}.passed"
        _pids(monkeypatch, fit_module, "train_one_epoch", fitted)
        _pids(monkeypatch, FrozenPass, "run", passed)
        assert fold_processes(config, 3) == int(threads)
        record = fit_run(config, tmp_path / out)
        assert len(record.metrics.folds) == 3
        assert all((tmp_path / out / f"fold-{k}" / "best.pt").exists() for k in range(3))
        fitters = set(fitted.read_text().split())
        assert fitters == {here} if threads == "1" else len(fitters) == 3 and here not in fitters
        if threads == "2":  # the backbone passed every image here, before the folds: they read its cache
            assert set(passed.read_text().split()) == {here}
        with open(tmp_path / out / "oof.csv") as fh:
            rows = list(csv.DictReader(fh))
        answers[out] = {r["path"]: [float(v) for k, v in r.items() if k.startswith("p_")] for r in rows}
    one, side = answers["one-by-one"], answers["side-by-side"]
    assert one.keys() == side.keys()
    assert max(abs(a - b) for p in one for a, b in zip(one[p], side[p], strict=True)) < 1e-5


def test_an_error_in_a_fold_fitted_beside_others_is_the_commands_error(
    tiny_data: Path, weights: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("DEFUNGI_THREADS", "2")

    def broken(*args, **kwargs):
        raise DefungiError("the training loss became nan in epoch 1")

    monkeypatch.setattr(fit_module, "train_one_epoch", broken)
    with pytest.raises(DefungiError, match="became nan"):
        fit_run(_frozen_cv(tiny_data, weights), tmp_path / "cv")
    assert not (tmp_path / "cv" / "metrics.json").exists()


def test_folds_fit_one_after_the_other_unless_they_share_one_frozen_pass(tiny_data: Path, weights: Path, monkeypatch):
    monkeypatch.setenv("DEFUNGI_THREADS", "4")
    assert fold_processes(_frozen_cv(tiny_data, weights), 3) == 3  # at most one process per fold
    assert fold_processes(_frozen_cv(tiny_data, weights), 5) == 4  # and per thread
    assert fold_processes(_config(tiny_data), 3) == 1  # the whole model trains: its own passes
    assert fold_processes(_frozen_cv(tiny_data, weights, **{"data.normalize": "dataset"}), 3) == 1  # per fold
    assert fold_processes(_frozen_cv(tiny_data, weights, **{"train.ensemble": 2}), 3) == 1
    monkeypatch.setenv("DEFUNGI_THREADS", "1")
    assert fold_processes(_frozen_cv(tiny_data, weights), 3) == 1
