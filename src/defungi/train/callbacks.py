"""Stateful callbacks that a resumed run restores exactly."""

from __future__ import annotations

import math
from typing import Any


class EarlyStopping:
    """Stop when the monitored metric has not improved for patience_epochs; remember the best."""

    def __init__(self, patience_epochs: int, min_epochs: int = 0, mode: str = "max", min_delta: float = 0.0) -> None:
        self.patience_epochs, self.min_epochs, self.mode, self.min_delta = patience_epochs, min_epochs, mode, min_delta
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch = -1
        self.epochs_without_improvement = 0
        self.reason = ""

    def improved(self, value: float) -> bool:
        """Is value better than the best so far (by more than min_delta)?"""
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def step(self, value: float, epoch: int) -> bool:
        """Record one epoch's metric; True when training should stop (reason says why)."""
        if self.improved(value):
            self.best, self.best_epoch, self.epochs_without_improvement = value, epoch, 0
        else:
            self.epochs_without_improvement += 1
        if (
            self.patience_epochs > 0
            and epoch + 1 >= self.min_epochs
            and self.epochs_without_improvement >= self.patience_epochs
        ):
            best = f"best {self.best:.4f} at epoch {self.best_epoch + 1}"
            self.reason = f"no improvement for {self.epochs_without_improvement} epochs ({best})"
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly."""
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from state_dict()."""
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.epochs_without_improvement, self.reason = state["epochs_without_improvement"], state["reason"]
