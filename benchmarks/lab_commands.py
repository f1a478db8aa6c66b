"""The README's lab commands from a cold cache, one after another as a lab would type them, each timed
from the shell (Python's start and imports included), with the CPU's flags:

    python benchmarks/lab_commands.py --data DIR [--out runs/bench-commands]

train (transfer recipe, 3-fold CV), predict on 1,000 images of DIR (every n-th file, as
benchmarks/lab_loop.py picks them) by specimen, evaluate on the same images, report, explain one
specimen of about 20 images, export, and predict on ONNX. The cache is a new folder under --out.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lab_loop import cli, fresh, linked_files, specimen_of_about, spread  # benchmarks/, the script's own folder

from defungi.serve.predict import expand_paths
from defungi.utils import cpu_flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/bench-commands")
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data)
    env = fresh(out)
    files = expand_paths([data])
    sample = spread(files)
    answers = linked_files(sample, out / "answers")
    name, specimen = specimen_of_about(files, 20)
    run = str(out / "lab")
    train = ["train", "--profile", "transfer", "--cv", "3", "--data", str(data), "--out", run]
    commands = [
        ("train --profile transfer --cv 3", train),
        (f"predict {len(sample):,} images --by-specimen", ["predict", run, str(answers), "--by-specimen"]),
        (f"evaluate on the {len(sample):,} images", ["evaluate", run, "--data", str(answers)]),
        ("report", ["report", run]),
        (f"explain {len(specimen)} images ({name})", ["explain", run, *map(str, specimen), "--out", f"{run}/explain"]),
        ("export", ["export", run]),
        (f"predict {len(sample):,} images --backend onnx", ["predict", run, str(answers), "--backend", "onnx"]),
    ]  # fmt: skip
    print(f"CPU flags: {cpu_flags()}; {len(os.sched_getaffinity(0))} cores; cache {out / 'cache'} (empty at the start)")
    print(f"{'command':<44} {'seconds':>8}")
    for label, command in commands:
        print(f"{label:<44} {cli(command, env)[0]:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
