"""One grid of 6 cells on a PostgreSQL-backed Optuna study: 1, 2 and 3 `defungi grid` workers,
side by side in one run, each on a fresh database of a throwaway server (Debian's postgresql).

Prints each run's wall time, its ratio to one worker, and which worker fitted how many cells;
the workers split the machine's cores between them (OMP_NUM_THREADS). The CPU's AVX-512 flags
are printed beside the times.

    python benchmarks/shared_grid.py --data DIR [--fraction 0.2 --image-size 32 --epochs 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.postgres: the throwaway server

from defungi.utils import cpu_flags  # noqa: E402
from tests.postgres import new_database, postgres  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    grid = ["--batch-sizes", "32,64", "--lrs", "1e-3,2e-3,4e-3"]
    common = ["--data", args.data, "--fraction", str(args.fraction), "--image-size", str(args.image_size)]
    common += ["--epochs", str(args.epochs), "--model", "convmixer", "--set", "train.tta=false"]
    common += ["--set", 'train.model_args={"dim": 64, "depth": 4, "kernel_size": 5, "patch_size": 4}', *grid]
    times = {}
    with postgres() as server, tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"DEFUNGI_CACHE": str(Path(tmp) / "cache")}
        warm = [sys.executable, "-m", "defungi", "grid", *common, "--out", str(Path(tmp) / "warm")]
        subprocess.run([*warm, "--batch-sizes", "32", "--lrs", "1e-3", "--epochs", "1"], env=env, check=True)
        for workers in (1, 2, 3):
            url = new_database(server, f"bench{workers}")
            threads = str(max(1, cores // workers))
            start = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "defungi",
                        "grid",
                        *common,
                        "--storage",
                        url,
                        "--out",
                        f"{tmp}/w{workers}-{i}",
                    ],
                    env=env | {"OMP_NUM_THREADS": threads},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for i in range(workers)
            ]
            outs = [p.communicate() for p in procs]
            times[workers] = time.perf_counter() - start
            failed = [err[-1500:] for p, (_, err) in zip(procs, outs, strict=True) if p.returncode]
            assert not failed, failed[0]
            fitted = [len(list(Path(f"{tmp}/w{workers}-{i}/fits").glob("*/metrics.json"))) for i in range(workers)]
            best = outs[0][0].strip().splitlines()[-1]
            print(
                f"{workers} worker(s), {threads} thread(s) each: {times[workers]:6.1f} s  cells fitted {fitted}  {best}"
            )
    print(f"{cores} cores; CPU: {cpu_flags()}")
    for workers in (2, 3):
        print(f"wall time, {workers} workers / 1 worker: {times[workers] / times[1]:.2f}")


if __name__ == "__main__":
    main()
