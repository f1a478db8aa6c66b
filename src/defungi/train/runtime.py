"""The torch side of the shared helpers: the device, seeds, and checkpoints written atomically
(`defungi.utils` holds the rest, without torch, so that reports never import it)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defungi.errors import DefungiError
from defungi.utils import atomic_write_binary


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save, atomically."""
    atomic_write_binary(path, lambda fh: torch.save(obj, fh))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        visible = torch.cuda.device_count()
        raise DefungiError(f"--device {name}: no such CUDA GPU here ({visible} visible); use cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DefungiError(f"--device {name}: MPS is not available here; use cpu or auto")
    return device
