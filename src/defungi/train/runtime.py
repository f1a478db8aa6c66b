"""The torch side of the shared helpers: the device, seeds, and checkpoints written atomically
(`defungi.utils` holds the rest, without torch, so that reports never import it)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from defungi.errors import DefungiError
from defungi.utils import atomic_write_binary

log = logging.getLogger(__name__)


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


THREADS_ENV = "DEFUNGI_THREADS"  # a fixed number of threads (as does OMP_NUM_THREADS); unset: chosen


def _busy_seconds(cpus: set[int]) -> float:
    """CPU seconds the given cores have spent busy (every process), from /proc/stat; 0 where it is missing."""
    path = Path("/proc/stat")
    if not path.exists():
        return 0.0
    ticks = 0
    for line in path.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
            ticks += user + nice + system + irq + softirq + steal
    return ticks / os.sysconf("SC_CLK_TCK")


class Threads:
    """How many threads torch computes with on a CPU, chosen again before each epoch: the cores this
    process may use, less those that other processes kept busy since the last choice (rounded). With 2
    threads, OpenMP training ran ~4x slower while another process held a core (benchmarks/
    threads_under_load.py), so a core others use is left to them. DEFUNGI_THREADS=N or OMP_NUM_THREADS=N
    fixes the number; on a GPU nothing is changed."""

    def __init__(self, device: torch.device) -> None:
        self.cpus = (
            set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        )
        fixed = os.environ.get(THREADS_ENV) or os.environ.get("OMP_NUM_THREADS")
        self.fixed = int(fixed) if fixed and fixed.isdigit() and int(fixed) > 0 else None
        self.active = device.type == "cpu"
        self.since = self._sample()
        if self.active and self.fixed:
            torch.set_num_threads(self.fixed)

    def _sample(self) -> tuple[float, float, float]:
        return time.perf_counter(), _busy_seconds(self.cpus), time.process_time()

    def others_busy(self) -> float:
        """Cores that other processes kept busy since the last call (0 where unknown)."""
        now = self._sample()
        wall, busy, own = (a - b for a, b in zip(now, self.since, strict=True))
        self.since = now
        return max(0.0, (busy - own) / wall) if wall > 0.05 else 0.0

    def choose(self) -> int:
        """Set and return the number of threads for what comes next (the next epoch)."""
        if not self.active:
            return torch.get_num_threads()
        others = self.others_busy()
        threads = self.fixed or max(1, len(self.cpus) - round(others))
        if threads != torch.get_num_threads():
            log.info("%d threads (other processes kept %.1f of %d cores busy)", threads, others, len(self.cpus))
            torch.set_num_threads(threads)
        return threads


def single_threaded() -> None:
    """This process computes on one thread from now on: torch (and every Threads after it, through
    DEFUNGI_THREADS) and the BLAS that numpy and scipy call. For a process forked to fit beside others,
    one per core: two threads each ran the refusal detector's fit 2x slower there."""
    os.environ[THREADS_ENV] = "1"
    torch.set_num_threads(1)
    threadpool_limits(1)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch computes on one thread within (as before after): for work beside a process that keeps a
    core busy (exporting Lite0's frozen pass beside a decoding process: 0.5 s against 1.0-1.5 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def to_onnx(module: torch.nn.Module, example: torch.Tensor, outputs: list[str], opset: int = 17) -> bytes:
    """module as an ONNX graph: uint8 NHWC 'images' in, the named outputs, a free 'batch' axis. The
    TorchScript exporter (dynamo=False): its graph (batch norm folded into the convolutions) ran
    ConvMixer-8 at 217 images/s on onnxruntime here, the dynamo exporter's at 112."""
    graph = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the normalisation constants, an early stop
        torch.onnx.export(
            module.eval(),
            (example,),
            graph,
            input_names=["images"],
            output_names=outputs,
            opset_version=opset,
            dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]},
            dynamo=False,
        )
    return graph.getvalue()
