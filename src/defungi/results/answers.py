"""What `defungi predict` answers, as typed records: an image's answer and a specimen's decision,
printed as JSON objects whose keys are the fields a record holds (class probabilities under their own
'probabilities' key, never beside the fields, so that a class may be called 'class' or 'status').
No torch here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _shown(record: Any, always: tuple[str, ...]) -> dict[str, Any]:
    """A record's fields in order as JSON keys ('class_' as 'class'), without those it does not hold
    (None), except the fields of always."""
    pairs = ((f.name.rstrip("_"), getattr(record, f.name)) for f in dataclasses.fields(record))
    return {k: v for k, v in pairs if v is not None or k in always}


@dataclass
class ImageAnswer:
    """One image file's answer: its error (unreadable); else its true class where the folder or the
    file name gives one ('label'), and either why it was not classified ('status': no fungus visible,
    with its grey variance and the run's threshold; not a fungus micrograph, with its refusal score
    'ood') or the predicted class, calibrated confidence, the class's probability, decision, prediction
    set and every class's probability. Fields in the JSON's key order."""

    path: str
    error: str | None = None
    label: str | None = None
    status: str | None = None
    grey_variance: float | None = None
    variance_threshold: float | None = None
    class_: str | None = None  # 'class' in the JSON and CSV
    confidence: float | None = None  # calibrated
    probability: float | None = None  # the model's, of the class
    decision: str | None = None  # the class, or 'uncertain'
    set: str | None = None  # as a lab reads it, e.g. 'H1 or H2'
    set_classes: list[str] | None = None
    set_size: int | None = None
    probabilities: dict[str, float] | None = None  # class -> probability
    ood: float | None = None  # the refusal score, where the run has a detector
    unlike_training: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """The answer as predict prints it: the fields it holds ('label' for every file that was read)."""
        return _shown(self, () if self.error else ("label",))


@dataclass
class SpecimenAnswer:
    """One specimen's decision from its images (see serve.predict.by_specimen): how many there are,
    were classified, counted (classified and not 'uncertain'), had no fungus visible, were refused, and
    were unlike the training specimens; then its pooled class, calibrated confidence, probability,
    decision, set, probabilities and what a lab reads ('answer'), or why it has none ('status').
    Fields in the JSON's key order."""

    specimen: str
    path: str  # the folder that holds all its images
    label: str | None
    images: int
    classified: int
    counted: int
    no_fungus: int
    refused: int
    unlike_training: int
    flag: str | None = None
    class_: str | None = None
    confidence: float | None = None
    probability: float | None = None
    decision: str | None = None
    set: str | None = None
    set_classes: list[str] | None = None
    set_size: int | None = None
    probabilities: dict[str, float] | None = None
    answer: str | None = None
    status: str | None = None
    rows: list[ImageAnswer] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The decision as predict prints it, with its images' answers."""
        return _shown(self, ("label",)) | {"rows": [r.to_json() for r in self.rows]}
