"""A lab's loop against the model alone, side by side in one run: train the transfer recipe by grouped
3-fold CV from an empty cache, add one specimen and train again, answer 1,000 images on both
backends and evaluate them as a labelled folder, answer a specimen of 20 images as the page does,
with and without maps. Each figure is printed beside the model alone (EfficientNet-Lite0 at 224 px,
batch 32: the faster of torch, channels-last, and onnxruntime on four batches), with the CPU's
flags, on the same images in the same run: the cold training beside the model alone's pass over the
images it passed through its backbone, timed batch by batch (their decoding left out) just before the
training (over every image of the folder, scaled to those passed) and just after it, the mean of the two
(the host's speed drifted by up to a fifth between runs a few minutes apart); the answers
on 1,000 images in turns with the model alone on the same 1,000 images, three times, the median of
the three ratios printed (one turn's ratio moved by 0.05 with the machine's noise).

    python benchmarks/lab_loop.py --data DIR [--out runs/bench-lab] [--reference RUN]

--reference: a finished `train --profile transfer --cv 3` run on the same folder (e.g. from an
earlier commit); its out-of-fold probabilities, refusals and sets are compared with this run's.
Run it on an otherwise idle machine: with 2 cores, a second busy process slows torch about 4x.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defungi.data.cache import decode_one
from defungi.data.scan import parse_name
from defungi.models import create_model
from defungi.models.pretrained import initial_weights
from defungi.serve.evaluate import evaluate_folder
from defungi.serve.explain import explained
from defungi.serve.predict import expand_paths, predict, predict_files
from defungi.serve.predictor import torch_predictor
from defungi.train.frozen import BATCH, images_per_s
from defungi.utils import cpu_flags, fewer_collections, ort_session

MODEL, SIZE = "efficientnet-lite0", 224
REPEATS = 3  # turns of the model alone and both backends on the 1,000 images (medians reported)


def model_alone(images: np.ndarray, folder: Path) -> tuple[dict[str, float], Callable[[np.ndarray], Any]]:
    """Images per second of EfficientNet-Lite0 alone on normalised float batches: torch (channels-last,
    fp32) and onnxruntime (the same model exported), batch BATCH; and the faster of the two as a
    function of such a batch (BATCH x 3 x SIZE x SIZE float32)."""
    model = create_model(MODEL, num_classes=5)
    initial_weights(model, MODEL, pretrained=True)
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.from_numpy(images[:BATCH]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(4):
            model(x)
        on_torch = 4 * BATCH / (time.perf_counter() - start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(folder / "alone.onnx"), input_names=["images"], dynamo=False)
    # onnxruntime's own defaults (threads that spin between calls), the batch fixed as defungi fixes it
    session = ort_session(folder / "alone.onnx", torch.get_num_threads(), BATCH, spin=True)

    def torch_batch(batch: np.ndarray) -> Any:
        with torch.no_grad():
            return model(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))

    def ort_batch(batch: np.ndarray) -> Any:
        return session.run(None, {"images": batch})

    rates = {"torch": on_torch, "onnxruntime": images_per_s(ort_batch, x.numpy(), 4)}
    return rates, ort_batch if rates["onnxruntime"] >= rates["torch"] else torch_batch


def normalised(files: Sequence[Path]) -> np.ndarray:
    """The files decoded at SIZE as the model alone takes them: float NCHW in [-1, 1]."""
    return np.stack([decode_one(f, SIZE)[0] for f in files]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1


def alone_seconds(run: Callable[[np.ndarray], Any], files: Sequence[Path], inputs: np.ndarray | None = None) -> float:
    """Seconds of the model alone (run: model_alone's) over files, BATCH at a time, the last batch padded
    as the pass pads it; decoding and normalising (inputs: done beforehand) are left out of the time."""
    seconds = 0.0
    for start in range(0, len(files), BATCH):
        x = normalised(files[start : start + BATCH]) if inputs is None else inputs[start : start + BATCH]
        if len(x) < BATCH:
            x = np.concatenate([x, np.zeros((BATCH - len(x), *x.shape[1:]), dtype=np.float32)])
        begin = time.perf_counter()
        run(np.ascontiguousarray(x))
        seconds += time.perf_counter() - begin
    return seconds


def passed(run: Path) -> list[Path]:
    """The images a transfer CV run passed through its backbone: its out-of-fold rows' files."""
    with open(run / "oof.csv") as fh:
        return [Path(row["path"]) for row in csv.DictReader(fh)]


def fresh(out: Path) -> dict[str, str]:
    """out emptied, and the environment whose user cache is a new folder in it."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return os.environ | {"DEFUNGI_CACHE": str(out / "cache")}


def spread(files: Sequence[Path], n: int = 1000) -> list[Path]:
    """n of the files, evenly spread over them (every class's share)."""
    return [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]


def cli(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Seconds of a `defungi` command in its own process, and what it logged."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "defungi", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"defungi {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def computed_images(log: str) -> int:
    """Images that a command passed through the frozen backbone (its 'of N images' log lines)."""
    return sum(int(n) for n in re.findall(r" of (\d+) images \(view", log))


def heads_seconds(run: Path) -> float:
    """Seconds the folds spent training their heads (their history)."""
    total = 0.0
    for history in run.glob("fold-*/history.csv"):
        with open(history) as fh:
            total += sum(float(row["seconds"]) for row in csv.DictReader(fh))
    return total


def linked_files(files: Sequence[Path], to: Path) -> Path:
    """A folder of links to files, each in a folder named as its own (its class)."""
    for path in files:
        (to / path.parent.name).mkdir(parents=True, exist_ok=True)
        (to / path.parent.name / path.name).symlink_to(path.resolve())
    return to


def linked(data: Path, to: Path, leave_out: str | None) -> int:
    """A folder of links to data's images (class folders kept), without the specimen leave_out; how many."""
    kept = [path for path in expand_paths([data]) if not leave_out or specimen_name(path) != leave_out]
    linked_files(kept, to)
    return len(kept)


def specimen_name(path: Path) -> str | None:
    """A DeFungi file's specimen: its class and specimen number (None for another name)."""
    parsed = parse_name(path.stem)
    return f"{parsed['cls'].upper()}_{parsed['sample']}" if parsed else None


def specimen_of_about(files: list[Path], n: int) -> tuple[str, list[Path]]:
    """A specimen (DeFungi class and specimen number) with about n images, and its files."""
    specimens: dict[str, list[Path]] = {}
    for f in files:
        if (name := specimen_name(f)) is not None:
            specimens.setdefault(name, []).append(f)
    name = min(specimens, key=lambda g: (abs(len(specimens[g]) - n), g))
    return name, specimens[name]


def oof(run: Path) -> dict[str, tuple[np.ndarray, float]]:
    """Out-of-fold probabilities and refusal score of each image, by class folder and file name."""
    with open(run / "oof.csv") as fh:
        rows = list(csv.DictReader(fh))
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    return {
        f"{Path(r['path']).parent.name}/{Path(r['path']).name}": (
            np.array([float(r[f"p_{c}"]) for c in classes]),
            float(r.get("ood") or 0),
        )
        for r in rows
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/bench-lab")
    parser.add_argument("--reference", help="a transfer CV run of the same folder to compare answers with")
    args = parser.parse_args()
    fewer_collections()  # as the `defungi` command collects: answers are timed in this process
    out, data = Path(args.out), Path(args.data)
    env = fresh(out)
    os.environ["DEFUNGI_CACHE"] = env["DEFUNGI_CACHE"]
    files = expand_paths([data])
    name, specimen = specimen_of_about(files, 20)
    rows: list[tuple[str, str, str, str, str]] = []

    sample = spread(files)
    images = np.stack([decode_one(f, SIZE)[0] for f in sample[:BATCH]])
    alone, alone_run = model_alone(images, out)
    best = max(alone.values())
    print(f"CPU flags: {cpu_flags()}; {torch.get_num_threads()} threads")
    print(
        f"model alone ({MODEL}, {SIZE} px, batch {BATCH}): torch {alone['torch']:.1f} img/s, "
        f"onnxruntime {alone['onnxruntime']:.1f} img/s -> {best:.1f} img/s"
    )

    # cold training without one specimen, then with it
    less, full = out / "data-less", out / "data-full"
    n_less = linked(data, less, name)
    linked(data, full, None)
    train = ["train", "--profile", "transfer", "--cv", "3"]
    every = alone_seconds(alone_run, expand_paths([less]))  # the host's speed drifts: the pass timed before too
    cold_s, cold_log = cli([*train, "--data", str(less), "--out", str(out / "cold")], env)
    (out / "cold.log").write_text(cold_log)  # its phases, timed to the second by its log lines
    kept = passed(out / "cold")
    before, after = every * len(kept) / n_less, alone_seconds(alone_run, kept)
    heads, pass_s = heads_seconds(out / "cold"), (before + after) / 2
    expected = pass_s + heads
    rows.append(
        (
            "cold training (empty cache)",
            f"{cold_s:.0f} s",
            f"{pass_s:.0f} s pass ({before:.0f}, {after:.0f}) + {heads:.0f} s heads",
            f"{cold_s / expected:.2f}",
            "<= 1.5",
        )
    )
    again_s, again_log = cli([*train, "--data", str(full), "--out", str(out / "again")], env)
    rows.append(
        (
            "cold training, against the pass + a warm run",
            f"{cold_s:.0f} s",
            f"{pass_s:.0f} s pass + {again_s:.0f} s warm",
            f"{cold_s / (pass_s + again_s):.2f}",
            "",
        )
    )
    rows.append(
        (
            f"after a new specimen ({len(specimen)} images)",
            f"{again_s:.0f} s",
            f"{computed_images(again_log)} images computed",
            "",
            "<= 30 s, new images only",
        )
    )

    # answers on 1,000 images, both backends, as predict runs them (model loaded in the call), and evaluate
    # on them as a labelled folder (its default backend; scored and written), each beside the model alone on
    # the same 1,000 images (decoded and normalised beforehand), in turn, REPEATS times
    run = out / "again"
    export_s, _ = cli(["export", str(run)], env)
    inputs, labelled = normalised(sample), linked_files(sample, out / "sample-1000")
    answers, rates = {}, {"alone": [], "torch": [], "onnx": [], "evaluate": []}
    for turn in range(REPEATS):
        rates["alone"].append(len(sample) / alone_seconds(alone_run, sample, inputs))
        for backend in ("torch", "onnx"):
            start = time.perf_counter()
            answers[backend] = predict_files(run, sample, backend, per_specimen=True)
            rates[backend].append(len(sample) / (time.perf_counter() - start))
        start = time.perf_counter()
        evaluate_folder(run, labelled, out / "evaluations" / str(turn))
        rates["evaluate"].append(len(sample) / (time.perf_counter() - start))
    on_1000 = float(np.median(rates["alone"]))
    labels = (("torch", "predict, default backend"), ("onnx", "predict --backend onnx"), ("evaluate", "evaluate"))
    for key, label in labels:
        ratio = np.median(np.array(rates[key]) / np.array(rates["alone"]))
        rows.append(
            (
                f"{label}, 1,000 images",
                f"{np.median(rates[key]):.1f} img/s",
                f"{on_1000:.1f} img/s",
                f"{ratio:.2f}",
                ">= 0.8",
            )
        )
    on_torch, on_onnx = answers["torch"], answers["onnx"]
    same = sum(a.decision == b.decision and a.set == b.set for a, b in zip(on_torch.rows, on_onnx.rows, strict=True))
    diff = max(
        abs(a.probabilities[c] - b.probabilities[c])
        for a, b in zip(on_torch.rows, on_onnx.rows, strict=True)
        if a.class_ is not None
        for c in on_torch.classes
    )

    # the page: the model loaded, one specimen's images answered, without and with maps
    model = torch_predictor(run)
    predict(model, specimen[:2])  # the first request warms the engine, as the page's first upload would
    start = time.perf_counter()
    predict(model, specimen)
    page_s = time.perf_counter() - start
    start = time.perf_counter()
    explained(model, specimen)
    maps_s = time.perf_counter() - start
    alone_20 = len(specimen) / best
    rows.append(
        (
            f"page: specimen of {len(specimen)} images",
            f"{page_s:.2f} s",
            f"{alone_20:.2f} s",
            f"{page_s / alone_20:.2f}",
            "<= 1 s",
        )
    )
    rows.append(
        ("page: the same with maps", f"{maps_s:.2f} s", f"{alone_20:.2f} s", f"{maps_s / alone_20:.2f}", "<= 3 s")
    )

    print(f"{'figure':<44} {'measured':>12} {'model alone':>34} {'ratio':>6}  target")
    for figure, measured, ref, ratio, target in rows:
        print(f"{figure:<44} {measured:>12} {ref:>34} {ratio:>6}  {target}")
    print(
        f"cold training: {n_less} images, {computed_images(cold_log)} passed through the backbone; "
        f"export {export_s:.0f} s (a process of its own)"
    )
    print(f"backends: same decision and set on {same}/{len(sample)} images; largest probability difference {diff:.1e}")
    if args.reference:  # the same folder and folds: this run with every image, against the reference
        ours, theirs = oof(out / "again"), oof(Path(args.reference))
        common = sorted(set(ours) & set(theirs))
        gap = max(float(np.abs(ours[p][0] - theirs[p][0]).max()) for p in common)
        ood_gap = max(abs(ours[p][1] - theirs[p][1]) for p in common)
        agree = sum(int(ours[p][0].argmax() == theirs[p][0].argmax()) for p in common)
        refused = sum(int((ours[p][1] > 1) == (theirs[p][1] > 1)) for p in common)
        print(
            f"against {args.reference}: {len(common)} out-of-fold images in both ({len(ours)} here); same class "
            f"on {agree}, same refusal on {refused}; largest difference of a probability {gap:.1e} (written to "
            f"6 decimals), of a refusal score {ood_gap:.1e} (4 decimals)"
        )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
