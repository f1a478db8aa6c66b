"""Data-parallel training over several processes (torchrun + DistributedDataParallel).

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; every process
builds the same model, trains on its share of each global batch (gradients averaged by DDP: gloo
on the CPU, NCCL on CUDA), and rank 0 alone validates, scores and writes. One process (no
torchrun) is the world of size 1, where everything here does nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from defungi.errors import DefungiError


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
