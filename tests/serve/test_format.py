"""What `defungi predict` prints: labelled confidence and probability, and the columns programs read."""

import csv
import io

from defungi.results.answers import ImageAnswer, SpecimenAnswer
from defungi.serve.format import as_csv, as_table
from defungi.serve.predict import Predictions, reason

CLASSES = ["H1", "H2"]


def _predictions() -> Predictions:
    """One specimen of two images in /lab/s1 (one refused as not a micrograph), answered as predict answers."""
    answered = ImageAnswer("/lab/s1/a.jpg", label="H1", class_="H1", decision="H1", confidence=0.93,
                           probability=0.82, set="H1", set_classes=["H1"], set_size=1,
                           probabilities={"H1": 0.82, "H2": 0.18}, ood=0.4, unlike_training=False)  # fmt: skip
    refused = ImageAnswer("/lab/s1/b.jpg", label="H1", status="not a fungus micrograph", ood=3.5)
    specimen = SpecimenAnswer("s1", "/lab/s1", "H1", images=2, classified=1, counted=1, no_fungus=0, refused=1,
                              unlike_training=0, class_="H1", confidence=0.91, probability=0.82, decision="H1",
                              set="H1 or H2", set_classes=CLASSES, set_size=2, probabilities={"H1": 0.82, "H2": 0.18},
                              answer="H1 or H2 (90% set)", rows=[answered, refused])  # fmt: skip
    return Predictions(CLASSES, [answered, refused], specimens=[specimen])


def test_csv_has_the_refusal_score_the_set_size_and_each_specimens_folder():
    rows = list(csv.DictReader(io.StringIO(as_csv(_predictions()))))
    specimen, answered, refused = rows
    assert specimen["level"] == "specimen" and specimen["path"] == "/lab/s1"
    assert specimen["set_size"] == "2" and specimen["probability"] == "0.82" and specimen["confidence"] == "0.91"
    assert answered["refusal_score"] == "0.4" and answered["set_size"] == "1" and answered["probability"] == "0.82"
    assert refused["refusal_score"] == "3.5" and refused["status"] == "not a fungus micrograph"
    assert specimen["refusal_score"] == "" and refused["set_size"] == ""
    kept = ["level", "specimen", "path", "label", "class", "decision", "confidence", "set", "answer", "p_H1", "p_H2"]
    assert set(kept) <= set(rows[0]) and list(rows[0])[-1] == "status"  # the columns there were, still there


def test_table_labels_the_calibrated_confidence_and_the_probability():
    lines = as_table(_predictions()).splitlines()
    head, specimen, image = lines[:3]
    for label, value in (("calibrated confidence", "0.91"), ("probability", "0.82")):
        end = head.index(label) + len(label)  # values right-aligned under their label
        assert specimen[end - len(value) : end] == value, label
    assert image[head.index("calibrated confidence") :].split()[:2] == ["0.93", "0.82"]
    legend = next(line for line in lines if line.startswith("probability: "))
    assert "a specimen's: its counted images'" in legend and "calibrated confidence: " in legend


def test_an_image_not_answered_reads_with_its_reason_and_its_figure():
    result = _predictions()
    faint = ImageAnswer("/lab/s1/c.jpg", label="H1", status="no fungus visible", grey_variance=14.23,
                        variance_threshold=20.0)  # fmt: skip
    result.rows.append(faint)
    result.specimens[0].rows.append(faint)
    lines = as_table(result).splitlines()
    said = {name: line.split(name, 1)[1].strip() for line in lines for name in ("b.jpg", "c.jpg") if name in line}
    assert said == {
        "b.jpg": "not a fungus micrograph (refusal score 3.50, refused over 1.5)",
        "c.jpg": "no fungus visible (grey variance 14.2, under the threshold 20)",
    }
    rows = {r["path"]: r for r in csv.DictReader(io.StringIO(as_csv(result)))}
    assert rows["/lab/s1/c.jpg"]["grey_variance"] == "14.23" and rows["/lab/s1/c.jpg"]["status"] == "no fungus visible"
    assert rows["/lab/s1/b.jpg"]["grey_variance"] == "" and rows["/lab/s1/b.jpg"]["refusal_score"] == "3.5"
    specimen = SpecimenAnswer("s2", "/lab/s2", None, 1, 0, 0, 0, 1, 0, status="not a fungus micrograph")
    assert reason(specimen) == "not a fungus micrograph"  # no figure
