import numpy as np

from defungi.train.metrics import classification_metrics


def test_macro_metrics_and_confusion():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m["accuracy"] == 6 / 8
    assert np.isclose(m["recall"], (3 / 4 + 1 + 1 / 2) / 3)
    assert m["confusion_matrix"][0] == [3, 1, 0]
    assert m["per_class"]["c"]["support"] == 2
