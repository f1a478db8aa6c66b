"""How a run's refusal of non-micrographs did on micrographs it should answer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OodCheck:
    """Held-out micrographs (a fit's test part, or out of fold: each by the fold that never saw it)
    refused as 'not a fungus micrograph': their share, with a 95% interval from a bootstrap over
    specimens. Each fit's threshold was set at `quantile` of its validation images' distances."""

    source: str
    quantile: float
    thresholds: list[float]  # one per fit
    n: int
    refused: float
    interval: list[float]
