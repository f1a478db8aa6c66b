"""Data-parallel training over several processes (torchrun + DistributedDataParallel).

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; every process
builds the same model, trains on its share of each global batch (gradients averaged by DDP: gloo
on the CPU, NCCL on CUDA), and rank 0 alone validates, scores and writes. One process (no
torchrun) is the world of size 1, where everything here does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from defungi.errors import DefungiError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (a world of one process included)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that validates, scores and writes the run folder."""
        return self.rank == 0


def world() -> World:
    """The world torchrun set up for this process (size 1 without torchrun)."""
    env = os.environ
    ranks = (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    return World(*ranks, launched="WORLD_SIZE" in env)


def setup(device: torch.device) -> torch.device:
    """Join the process group once (NCCL for CUDA tensors and gloo for CPU ones on GPUs, gloo alone
    on CPUs); the device this rank trains on (its own GPU, by LOCAL_RANK)."""
    w = world()
    if not w.launched:
        return device
    if device.type == "cuda":
        if w.local_rank >= torch.cuda.device_count():
            raise DefungiError(
                f"process {w.local_rank} of this machine has no GPU of its own ({torch.cuda.device_count()} here); "
                "start at most that many with --nproc-per-node, or train with --device cpu"
            )
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device


def teardown() -> None:
    """Leave the process group (at the end of a distributed command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module that trains: DDP around model under torchrun, else model."""
    if not world().launched:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def shard(order: np.ndarray, batch_size: int) -> np.ndarray:
    """This rank's part of an epoch's order: of every global batch of batch_size, the rank's
    batch_size / world size consecutive positions (together the ranks see one process's batches)."""
    w = world()
    if w.size == 1:
        return order
    local = batch_size // w.size
    steps = len(order) // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)[:, w.rank * local : (w.rank + 1) * local].ravel()


def reduce_stats(stats: dict[str, float]) -> dict[str, float]:
    """An epoch's training loss and accuracy over all ranks' images (their weighted means), their
    images summed, the slowest rank's seconds."""
    if world().size == 1:
        return stats
    n = stats["images"]
    sums = torch.tensor([stats["loss"] * n, stats["accuracy"] * n, n], dtype=torch.float64)
    dist.all_reduce(sums)
    seconds = torch.tensor([stats["seconds"]], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    total = max(float(sums[2]), 1.0)
    return {"loss": float(sums[0]) / total, "accuracy": float(sums[1]) / total, "images": int(sums[2])} | {
        "seconds": float(seconds[0])
    }


def from_main(value: Any) -> Any:
    """Rank 0's value on every rank (e.g. the epoch's validation row, which early stopping reads)."""
    if world().size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Start(NamedTuple):
    """What rank 0 decided at the start of a fit: whether it trains, and from which saved state."""

    trains: bool
    saved: Any = None  # what the fit resumes from (None: a fresh start)


class Sync:
    """The points where the processes of one fit meet: start, every epoch's end, the end.

    Every rank runs the same fit and makes the same calls in the same order; what rank 0 alone
    knows (the run folder, the validation) is passed as a function that rank 0 alone calls, and
    every rank gets its answer. In a world of one process each call is a plain function call.
    One Sync per fit.
    """

    def __init__(self, w: World | None = None) -> None:
        self.world = w if w is not None else world()
        self._start: Start | None = None

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes the run folder."""
        return self.world.main

    def start(self, saved: Callable[[], Any] | None = None) -> Start:
        """Rank 0's decision, met once: with saved (a function reading the state to resume from, None
        for a fresh fit) the run trains, without it it does not (e.g. it is finished). The other ranks'
        arguments are ignored; a rank's later calls return what it met (a follower hears the start
        before it loads the data, then fits with the same Sync)."""
        if self._start is None:
            decision = (Start(True, saved()) if saved is not None else Start(False)) if self.main else None
            self._start = from_main(decision)
        return self._start

    def epoch(self, stats: dict[str, float], row: Callable[[dict[str, float]], T]) -> T:
        """An epoch's end: its training stats over every rank's images (reduce_stats), then the history
        row that rank 0 makes of them (it alone validates), on every rank (early stopping reads it)."""
        stats = reduce_stats(stats)
        return from_main(row(stats) if self.main else None)

    def end(self, result: Callable[[], T]) -> T | None:
        """The fit's result, made by rank 0 alone (it scores); None on the other ranks."""
        return result() if self.main else None
