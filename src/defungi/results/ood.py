"""How a run's refusal of non-micrographs did on micrographs it should answer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OodCheck:
    """Held-out micrographs (a fit's test part, or out of fold: each by the fold that never saw it)
    refused as 'not a fungus micrograph' (score over refuse_over) and answered but flagged 'unlike the
    training specimens' (score over 1, up to refuse_over): their shares, with 95% intervals from a
    bootstrap over specimens, and the specimens with at least one such image. Each fit's threshold (a
    score of 1) was set at `quantile` of its validation images' distances."""

    source: str
    quantile: float
    thresholds: list[float]  # one per fit
    n: int
    refused: float
    interval: list[float]
    refuse_over: float = 1.0  # 1.0: a check from before images between 1 and stats.refusal.REFUSE were answered
    flagged: float = 0.0
    flagged_interval: list[float] = field(default_factory=list)
    specimens: int = 0
    specimens_refused: int = 0
    specimens_flagged: int = 0

    def summary(self) -> str:
        """The refusals and flags in one line."""
        low, high = self.interval
        text = f"refused as not a fungus micrograph: {self.refused:.1%} [{low:.1%}, {high:.1%}] of {self.n} images" + (
            f" ({self.specimens_refused} of {self.specimens} specimens had one)" if self.specimens else ""
        )
        if self.flagged_interval:
            low, high = self.flagged_interval
            text += (
                f"; answered but flagged unlike the training specimens: {self.flagged:.1%} [{low:.1%}, {high:.1%}] "
                f"({self.specimens_flagged} specimens had one)"
            )
        return text
