"""What one epoch of a fit records, as a typed record: a row of a run's history.csv, and of the
histories that last.pt, curve.json and study.json hold. No torch here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EpochRow:
    """One epoch of a fit: its learning rate, training stats, the scored model on the validation part,
    and its speed. Fields in history.csv's column order."""

    epoch: int  # from 1
    lr: float  # at the epoch's end
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_f1: float  # macro-F1
    images_per_s: float  # training images per second
    seconds: float  # the epoch's training time
