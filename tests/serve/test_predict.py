import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defungi.cli import main
from defungi.results.run import read_run_metrics
from defungi.serve.predict import Answers, by_specimen, open_predictor, predict, predict_files, probability_table
from defungi.serve.predictor import Predictor
from defungi.stats.metrics import specimen_probabilities, temper
from defungi.train.assess import selective_promise
from tests.conftest import TinyRun, tiny_args, write_folder


def test_one_decision_per_specimen_with_its_images_and_blank_fields(tiny_run: TinyRun, tmp_path: Path, capsys):
    held = write_folder(tmp_path / "held", samples_per_class=2, patches=3, seed=9)
    capsys.readouterr()
    assert main(["predict", str(tiny_run.run), str(held), "--by-specimen", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    specimens = {s["specimen"]: s for s in out["specimens"]}
    assert len(specimens) == 3 * 2 + 1  # six samples, and the blank field's own sample H1_99
    blank = specimens["H1_99"]
    assert blank["status"] == "no fungus visible" and blank["classified"] == 0 and "class" not in blank
    decided = specimens["H2_1"]
    assert decided["images"] == decided["classified"] == 3 and decided["label"] == "H2"
    mean_h2 = sum(r["probabilities"]["H2"] for r in decided["rows"]) / 3
    assert abs(decided["probabilities"]["H2"] - mean_h2) < 1e-6  # the decision is the mean probability of its images
    assert out["metrics"]["n"] == 6 and 0 <= out["metrics"]["f1"] <= 1
    assert main(["predict", str(tiny_run.run), str(held), "--by-sample"]) == 0
    table = capsys.readouterr().out
    assert "(3 of 3 images)" in table and "per specimen (6 with a known class): accuracy" in table
    assert "H1_99" in table and "no fungus visible" in table


def test_specimens_by_folder_or_pattern(tiny_run: TinyRun, tmp_path: Path, capsys):
    held = write_folder(tmp_path / "held", samples_per_class=1, patches=2, seed=4)
    capsys.readouterr()
    by_sample = ["predict", str(tiny_run.run), str(held), "--by-sample"]
    assert main([*by_sample, "--group-by", "folder", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["specimens"]) == 3  # one per class folder
    assert main([*by_sample, "--group-by", r"^(H\d)_", "--format", "json"]) == 0
    assert {s["specimen"] for s in json.loads(capsys.readouterr().out)["specimens"]} == {"H1", "H2", "H3"}
    assert main([*by_sample, "--group-by", "(unclosed"]) == 2
    assert "not a regular expression" in capsys.readouterr().err


def test_calibrated_confidence_and_abstention(tiny_run: TinyRun, capsys):
    temperature = read_run_metrics(tiny_run.run / "metrics.json").trust.temperatures["image"]
    assert temperature.fitted_on == "the validation part" and 0.05 <= temperature.temperature <= 20
    assert temperature.kept == (
        temperature.nll_after < temperature.nll_before and temperature.ece_after < temperature.ece_before
    )
    capsys.readouterr()
    assert main(["predict", str(tiny_run.run), str(tiny_run.data / "H2"), "--format", "json", "--abstain", "1"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if "class" in r]
    assert rows and all(r["decision"] == "uncertain" for r in rows)
    assert main(["predict", str(tiny_run.run), str(tiny_run.data / "H2"), "--format", "json"]) == 0
    assert all(r["decision"] == r["class"] for r in json.loads(capsys.readouterr().out))


def test_a_specimen_is_answered_with_its_prediction_set_and_uncertain_images_are_left_out(
    tiny_run: TinyRun, tmp_path: Path, capsys
):
    trust = read_run_metrics(tiny_run.run / "metrics.json").trust
    held = write_folder(tmp_path / "held", samples_per_class=2, patches=3, seed=9)
    args = ["predict", str(tiny_run.run), str(held), "--by-sample", "--format", "json"]
    assert main(args) == 0
    answer = json.loads(capsys.readouterr().out)
    assert "90%" in answer["note"] and answer["model"]["specimens"] > 0
    thresholds = trust.conformal(0.9, "specimen").threshold(["H1", "H2", "H3"])
    for s in (s for s in answer["specimens"] if "class" in s):
        calibrated = temper(_printed_probabilities(s), trust.temperatures["specimen"].applied)
        inside = [c for c, p, t in zip(("H1", "H2", "H3"), calibrated[0], thresholds, strict=True) if 1 - p <= t]
        assert set(s["set"].replace(" or ", ", ").split(", ")) == set(inside) | {s["class"]}
        assert s["answer"] == (s["class"] if s["set_size"] == 1 else f"{s['set']} (90% set)")
    assert main([*args, "--abstain", "1"]) == 0  # every image uncertain: no specimen is decided
    specimens = json.loads(capsys.readouterr().out)["specimens"]
    decided = [s for s in specimens if s["classified"]]
    assert decided and all(s["answer"] == "not sure: look yourself" and s["counted"] == 0 for s in decided)
    assert main([*args, "--coverage", "0.8"]) == 2
    assert capsys.readouterr().err.strip().endswith("calibrated prediction sets at 0.9, 0.95; use one")


def test_a_target_accuracy_answers_only_the_specimens_confident_enough(tiny_run: TinyRun, tmp_path: Path, capsys):
    curve = read_run_metrics(tiny_run.run / "metrics.json").trust.selective
    promised = [p for p in (selective_promise(curve, t / 20) for t in range(19, 0, -1)) if p is not None]
    target, threshold = promised[0].target, promised[0].threshold  # the highest target the run can promise
    held = write_folder(tmp_path / "held", samples_per_class=3, patches=3, seed=4)
    args = ["predict", str(tiny_run.run), str(held), "--by-sample", "--format", "json"]
    assert main([*args, "--target-accuracy", str(target)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert f"confidence >= {threshold:.2f} are at least {target:.0%} right" in answer["note"]
    assert "expect" in answer["note"] and "with probability 90%" in answer["note"]
    for s in (s for s in answer["specimens"] if "class" in s):  # one-class sets too: the threshold decides
        assert (s["answer"] == "not sure: look yourself") == (s["confidence"] < threshold - 1e-12)
    assert main([*args, "--format", "table", "--target-accuracy", str(target)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("selective answers: answered"))
    known = [s for s in answer["specimens"] if "class" in s]
    answered = [s for s in known if s["answer"] != "not sure: look yourself"]
    assert f"answered {len(answered)} of {len(known)} specimens" in line  # accuracy over the answered ones
    assert main([*args, "--target-accuracy", str(min(0.999, target + 0.05 * 3))]) in (0, 2)
    assert main([*args, "--target-accuracy", "0.9999"]) == 2
    assert "no confidence threshold is shown to reach it" in capsys.readouterr().err


def test_specimens_are_decided_by_the_runs_specimen_rule(tiny_run: TinyRun, tmp_path: Path):
    """A run whose train.specimen_rule is log_mean pools a specimen's counted images by their geometric
    mean; the rule travels in the predictor's metadata (so in an exported model), 'mean' when absent."""
    held = write_folder(tmp_path / "held", samples_per_class=2, patches=4, seed=5)
    trained = open_predictor(tiny_run.run)
    assert trained.specimen_rule == "mean" and trained.metadata()["specimen_rule"] == "mean"
    model = dataclasses.replace(trained, specimen_rule="log_mean")
    decided = [s for s in by_specimen(predict(model, [held]), model, Answers.of(model)) if s.class_ is not None]
    assert len(decided) == 6
    for s in decided:
        counted = probability_table([r for r in s.rows if r.decision in model.classes], model.classes)
        assert np.allclose(probability_table([s], model.classes)[0], specimen_probabilities(counted, "log_mean"))
    older = {k: v for k, v in trained.metadata().items() if k != "specimen_rule"}
    assert Predictor.from_metadata(older, trained.scores, "old.onnx").specimen_rule == "mean"


def test_answers_carry_their_probability_beside_the_calibrated_confidence_and_specimens_their_folder(
    tiny_run: TinyRun, tmp_path: Path, capsys
):
    """An image's 'probability' is the model's for its class, a specimen's the pooled (mean) one of its
    counted images; 'confidence' is that probability calibrated; a specimen's path is its images' folder."""
    held = write_folder(tmp_path / "held", samples_per_class=2, patches=3, seed=9)
    capsys.readouterr()
    assert main(["predict", str(tiny_run.run), str(held), "--by-sample", "--format", "json"]) == 0
    specimens = json.loads(capsys.readouterr().out)["specimens"]
    trust = read_run_metrics(tiny_run.run / "metrics.json").trust
    for s in (s for s in specimens if "class" in s):
        assert s["path"] == str(held / s["label"])
        assert s["probability"] == max(s["probabilities"].values()) == s["probabilities"][s["class"]]
        calibrated = temper(_printed_probabilities(s), trust.temperatures["specimen"].applied)
        assert abs(s["confidence"] - calibrated.max()) < 1e-9
        for r in s["rows"]:
            assert r["probability"] == r["probabilities"][r["class"]] == max(r["probabilities"].values())
    assert main(["predict", str(tiny_run.run), str(held), "--by-sample", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["path"] for r in rows if r["level"] == "specimen"} == {str(held / c) for c in ("H1", "H2", "H3")}
    decided = [r for r in rows if r["class"]]
    assert decided and all(int(r["set_size"]) == len(r["set"].replace(" or ", ", ").split(", ")) for r in decided)
    assert all(r["refusal_score"] == "" for r in rows)  # the tiny run has no refusal detector


def test_classes_named_like_fields_leave_the_fields_alone(tmp_path: Path, capsys):
    """A run whose class folders are called 'class', 'confidence' and 'status': predict's rows, CSV and
    JSON keep those fields (the predicted class, its calibrated confidence, why an image was not
    answered), and the probabilities sit apart ('probabilities'; 'p_' columns in the CSV), summing to 1."""
    names = ["class", "confidence", "status"]
    data = write_folder(tmp_path / "data", samples_per_class=3, patches=4, classes=tuple(names))
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *tiny_args({"train.amp": False})]) == 0
    model = open_predictor(run)
    assert model.classes == names

    rows = predict(model, [data])
    answered = [r for r in rows if r.decision is not None]
    assert len(answered) == len(rows) - 1 and answered[0].status is None
    (blank,) = (r for r in rows if r.decision is None)
    assert blank.status == "no fungus visible" and blank.label == "class"
    probs = probability_table(answered, names)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    calibrated = temper(probs, model.temperature("image"))
    for r, p, q in zip(answered, probs, calibrated, strict=True):
        assert r.class_ == names[int(p.argmax())] and r.probability == r.probabilities[r.class_]
        assert r.confidence == pytest.approx(q.max()) and r.status is None
        shown = r.to_json()  # the fields under their names, the classes under 'probabilities' alone
        assert shown["class"] == r.class_ and shown["confidence"] == r.confidence and "status" not in shown
        assert list(shown)[:2] == ["path", "label"] and shown["probabilities"] == dict(zip(names, p, strict=True))

    capsys.readouterr()
    assert main(["predict", str(run), str(data), "--by-sample", "--format", "csv"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    header = table[0]
    assert len(set(header)) == len(header) and [f"p_{c}" for c in names] == [h for h in header if h[:2] == "p_"]
    lines = [dict(zip(header, line, strict=True)) for line in table[1:]]
    for line in (x for x in lines if x["decision"]):
        assert line["class"] in names and 0 < float(line["confidence"]) <= 1 and line["status"] == ""
        assert abs(sum(float(line[f"p_{c}"]) for c in names) - 1) < 1e-4
    assert [x["status"] for x in lines if not x["decision"]] == ["no fungus visible"]

    assert main(["predict", str(run), str(data), "--by-sample", "--format", "json"]) == 0
    specimens = json.loads(capsys.readouterr().out)["specimens"]
    assert len(specimens) == 3  # one per class folder: the file names are not DeFungi's
    for unit in (u for s in specimens for u in [s, *s["rows"]] if "decision" in u):
        assert unit["class"] in names and isinstance(unit["confidence"], float) and "status" not in unit
        assert set(unit["probabilities"]) == set(names) and abs(sum(unit["probabilities"].values()) - 1) < 1e-4


def test_images_decoded_while_the_model_loads_get_the_models_answers(tiny_run_copy: Path, tmp_path: Path):
    held = write_folder(tmp_path / "held", samples_per_class=2, patches=2, seed=5)
    files = sorted(held.rglob("*.jpg"))
    expected = predict(open_predictor(tiny_run_copy), files)
    assert any(r.class_ for r in expected) and any(r.status == "no fungus visible" for r in expected)
    assert predict_files(tiny_run_copy, files).rows == expected  # decoded from config.json's figures, loaded beside
    config = tiny_run_copy / "config.json"
    edited = json.loads(config.read_text())
    edited["data"]["variance_threshold"] = 10000.0  # no longer what the checkpoints say: the model's figures win
    config.write_text(json.dumps(edited))
    assert predict_files(tiny_run_copy, files).rows == expected


def _printed_probabilities(specimen: dict[str, Any]) -> np.ndarray:
    """A printed (JSON) specimen's probabilities as a one-row array, in the tiny run's class order."""
    return np.array([[specimen["probabilities"][c] for c in ("H1", "H2", "H3")]])
