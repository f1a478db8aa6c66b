"""What predict answers, as records: printed with the keys they hold, in a fixed order."""

import json

from defungi.results.answers import ImageAnswer, SpecimenAnswer


def test_an_answer_prints_the_fields_it_holds_in_order_and_a_class_named_like_a_field_stays_apart():
    answered = ImageAnswer("a/status_1.jpg", label="status", class_="class", confidence=0.9, probability=0.8,
                           decision="class", probabilities={"class": 0.8, "status": 0.2})  # fmt: skip
    shown = answered.to_json()
    assert list(shown) == ["path", "label", "class", "confidence", "probability", "decision", "probabilities"]
    assert shown["class"] == "class" and "status" not in shown and shown["probabilities"]["status"] == 0.2
    unlabelled = ImageAnswer("x.jpg", status="no fungus visible", grey_variance=3.0, variance_threshold=15.0)
    assert list(unlabelled.to_json()) == ["path", "label", "status", "grey_variance", "variance_threshold"]
    assert unlabelled.to_json()["label"] is None  # a file that was read says it has no known class
    assert ImageAnswer("y.jpg", error="unreadable image (OSError)").to_json() == {
        "path": "y.jpg",
        "error": "unreadable image (OSError)",
    }


def test_a_specimen_prints_its_counts_its_decision_and_its_images():
    image = ImageAnswer("s/a.jpg", label=None, status="not a fungus micrograph", ood=3.0)
    specimen = SpecimenAnswer("s", "s", None, 1, 0, 0, 0, 1, 0, status="not a fungus micrograph", rows=[image])
    shown = json.loads(json.dumps(specimen.to_json()))
    assert list(shown)[:3] == ["specimen", "path", "label"] and shown["label"] is None
    assert list(shown)[-2:] == ["status", "rows"] and "class" not in shown and "flag" not in shown
    assert shown["rows"] == [{"path": "s/a.jpg", "label": None, "status": "not a fungus micrograph", "ood": 3.0}]
