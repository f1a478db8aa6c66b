"""What `defungi predict` prints: labelled confidence and probability, and the columns programs read."""

import csv
import io

from defungi.serve.format import as_csv, as_table
from defungi.serve.predict import Predictions

CLASSES = ["H1", "H2"]


def _predictions() -> Predictions:
    """One specimen of two images in /lab/s1 (one refused as not a micrograph), answered as predict answers."""
    answered = {"path": "/lab/s1/a.jpg", "label": "H1", "class": "H1", "decision": "H1", "confidence": 0.93,
                "probability": 0.82, "set": "H1", "set_classes": ["H1"], "set_size": 1, "H1": 0.82, "H2": 0.18,
                "ood": 0.4}  # fmt: skip
    refused = {"path": "/lab/s1/b.jpg", "label": "H1", "status": "not a fungus micrograph", "ood": 3.5}
    specimen = {"specimen": "s1", "path": "/lab/s1", "label": "H1", "images": 2, "classified": 1, "counted": 1,
                "no_fungus": 0, "class": "H1", "confidence": 0.91, "probability": 0.82, "decision": "H1",
                "set": "H1 or H2", "set_classes": CLASSES, "set_size": 2, "H1": 0.82, "H2": 0.18,
                "answer": "H1 or H2 (90% set)", "rows": [answered, refused]}  # fmt: skip
    return Predictions(CLASSES, [answered, refused], specimens=[specimen])


def test_csv_has_the_refusal_score_the_set_size_and_each_specimens_folder():
    rows = list(csv.DictReader(io.StringIO(as_csv(_predictions()))))
    specimen, answered, refused = rows
    assert specimen["level"] == "specimen" and specimen["path"] == "/lab/s1"
    assert specimen["set_size"] == "2" and specimen["probability"] == "0.82" and specimen["confidence"] == "0.91"
    assert answered["refusal_score"] == "0.4" and answered["set_size"] == "1" and answered["probability"] == "0.82"
    assert refused["refusal_score"] == "3.5" and refused["status"] == "not a fungus micrograph"
    assert specimen["refusal_score"] == "" and refused["set_size"] == ""
    kept = ["level", "specimen", "path", "label", "class", "decision", "confidence", "set", "answer", "H1", "H2"]
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
