"""Training images/s with 1 and with all threads, on an idle machine and while another process keeps
one core busy, side by side in one run; and the number of threads `defungi.train.runtime.Threads`
(what every fit uses) picks in each case. Run it with the machine otherwise idle.

    python benchmarks/threads_under_load.py [--model resnet34 --image-size 64 --batch-size 32 --steps 12]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn

from defungi.models import create_model
from defungi.train.runtime import THREADS_ENV, Threads
from defungi.utils import cpu_flags

BUSY = "while True: pass"  # one core kept busy, as another process would


def images_per_s(model: nn.Module, batch: int, size: int, steps: int, threads: int) -> float:
    """Forward, backward and step on a random batch in fp32, after 2 warm-up steps."""
    torch.set_num_threads(threads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 5, (batch,))
    t0 = 0.0
    for step in range(steps + 2):
        if step == 2:
            t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - t0)


def picked() -> int:
    """What Threads picks after watching the machine for 2 s."""
    threads = Threads(torch.device("cpu"))
    time.sleep(2.0)
    return threads.choose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    if os.environ.get(THREADS_ENV) or os.environ.get("OMP_NUM_THREADS"):
        sys.exit(f"unset {THREADS_ENV} and OMP_NUM_THREADS: this benchmark sets the threads itself")
    cores = len(os.sched_getaffinity(0))
    model = create_model(args.model, num_classes=5).train()
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size}, fp32, {cores} cores, CPU: {cpu_flags()}")
    rates: dict[tuple[str, int], float] = {}
    for load in ("idle", "one core busy"):
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load != "idle" else None
        try:
            choice = picked()
            for threads in sorted({1, cores}):
                rates[load, threads] = images_per_s(model, args.batch_size, args.image_size, args.steps, threads)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        row = "  ".join(f"{t} thread(s): {rates[load, t]:6.1f} img/s" for t in sorted({1, cores}))
        print(f"{load:>14}: {row}  | Threads picks {choice}")
    for load in ("idle", "one core busy"):
        print(f"{load}: {cores} threads / 1 thread = {rates[load, cores] / rates[load, 1]:.2f}")
    print(f"{cores} threads, busy / idle = {rates['one core busy', cores] / rates['idle', cores]:.2f}")


if __name__ == "__main__":
    main()
