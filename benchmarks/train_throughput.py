"""Training images/s, side by side in one run, same model, size, batch and threads:

(a) defungi's pipeline: decoded-image cache (uint8, memory-mapped) -> batched tensor augmentation
    -> forward/backward/step;
(b) a plain torchvision pipeline: ImageFolder + DataLoader decoding JPEGs every epoch;
(c) the limit: forward/backward/step on one batch already in memory;
(e) with --fit-images N, a whole fit as `defungi train` runs it (the quick profile: its epochs, weight
    average, validation every epoch, then 8-view scoring of the validation and test parts and the
    refusal detector's readings, in one pass) on N training images of the data, with validation and
    test parts of a real split's proportions: images trained per second of its wall time, and per
    second of its epochs alone. e/c is what a real fit keeps of the model's speed.
All three compute in the precision defungi trains in here (`train.amp`: bf16 autocast on CPUs
with native bf16, see `defungi.train.loop.autocast_dtype`); (d) is (c) in plain fp32, so c/d is
what mixed precision gains on this machine (`--no-amp`: everything in fp32).

Prints a/b, a/c and c/d (and e/c). `--file-size 500` first writes 500 px JPEG copies of the images (as in the
public release), to show that (a) does not depend on the files' size.

    python benchmarks/train_throughput.py --data ../shared/defungi [--model resnet34 --image-size 96]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torchvision import transforms

from defungi.config import load_config
from defungi.data.augment import augment_batch, balanced_order
from defungi.data.cache import decode_images
from defungi.data.dataset import load_dataset
from defungi.data.scan import scan
from defungi.data.splits import train_val_test_split
from defungi.experiments.fit import fit
from defungi.models import create_model
from defungi.train.loop import Preprocess, autocast, build_optimizer, precision_name


def step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, amp: bool):
    device = torch.device("cpu")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(device, amp):
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(steps: int, batch: int, produce_and_step) -> float:
    """Images/s over `steps` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        produce_and_step()
    return steps * batch / (time.perf_counter() - start)


def upscaled_copy(root: Path, side: int, limit: int) -> Path:
    """A folder with up to `limit` images per class re-saved as side x side JPEGs."""
    out = Path(tempfile.mkdtemp(prefix=f"defungi-{side}px-"))
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        (out / cls.name).mkdir()
        for f in sorted(cls.iterdir())[:limit]:
            Image.open(f).convert("RGB").resize((side, side), Image.BICUBIC).save(out / cls.name / f.name, quality=92)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("DEFUNGI_DATA", "../shared/defungi"))
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per pipeline per round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds, interleaving the pipelines; the median is reported"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers for (b); 0 keeps every pipeline on the same threads"
    )
    parser.add_argument("--file-size", type=int, default=0, help="re-save the images at this size first (e.g. 500)")
    parser.add_argument("--per-class", type=int, default=400, help="images per class used when re-saving")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="(a), (b), (c) in fp32 too")
    parser.add_argument("--fit-images", type=int, default=0, help="(e): a whole fit on this many training images")
    parser.add_argument("--fit-epochs", type=int, default=0, help="(e): its epochs (0: quick's final fits')")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = Path(args.data)
    if args.file_size:
        root = upscaled_copy(root, args.file_size, args.per_class)
    size, bs = args.image_size, args.batch_size

    records = scan(root)
    t0 = time.perf_counter()
    decoded = decode_images(
        records, size, cache_dir=Path(tempfile.mkdtemp(prefix="defungi-bench-cache-")), progress=False
    )
    decode_s = time.perf_counter() - t0
    classes = sorted({r.label for r in records})
    labels = np.array([classes.index(r.label) for r in records])
    images = decoded.images
    pre = Preprocess(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    device = torch.device("cpu")

    model = create_model(args.model, num_classes=len(classes)).to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss()
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.05)
    step = step_fn(model, optimizer, criterion, args.amp)
    step_fp32 = step_fn(model, optimizer, criterion, amp=False)
    model.train()

    # (a) defungi: balanced draws from the decoded cache, augmentation on the batch tensor
    generator = torch.Generator().manual_seed(0)
    order = balanced_order(labels, 10**6, np.random.default_rng(0))
    cursor = [0]

    def ours() -> None:
        idx = np.sort(order[cursor[0] : cursor[0] + bs])
        cursor[0] += bs
        x = augment_batch(pre.to_tensor(images[idx], device), "basic", generator)
        step(x, torch.from_numpy(labels[idx]))

    # (b) torchvision ImageFolder + DataLoader: decode, resize, flip, normalise every time
    tf = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    folder = torchvision.datasets.ImageFolder(str(records[0].path.parent.parent), transform=tf)
    loader = torch.utils.data.DataLoader(
        folder,
        batch_size=bs,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    it = [iter(loader)]

    def plain() -> None:
        try:
            x, y = next(it[0])
        except StopIteration:
            it[0] = iter(loader)
            x, y = next(it[0])
        step(x.contiguous(memory_format=torch.channels_last), y)

    # (c) the limit: the model alone on a batch already in memory
    x_mem = pre.to_tensor(images[:bs], device)
    y_mem = torch.from_numpy(labels[:bs])

    def limit() -> None:
        step(x_mem, y_mem)

    def limit_fp32() -> None:
        step_fp32(x_mem, y_mem)

    pipelines = {"a": ours, "b": plain, "c": limit, "d": limit_fp32}
    for fn in pipelines.values():  # warm-up: allocator, oneDNN kernels, first file reads
        fn()
        fn()
    runs: dict[str, list[float]] = {k: [] for k in pipelines}
    for _ in range(args.rounds):
        for k, fn in pipelines.items():
            runs[k].append(timed(args.steps, bs, fn))
    a, b, c, d = (statistics.median(runs[k]) for k in pipelines)
    files = f"{args.file_size} px JPEGs" if args.file_size else "files as found"
    precision = precision_name(device, args.amp)
    print(
        f"{args.model}, {size} px, batch {bs}, {args.threads} threads, {len(records)} images ({files}); "
        f"one-time decode into the cache: {decode_s:.1f} s"
    )
    print(f"(a) defungi pipeline, {precision:<9}       {a:8.1f} img/s")
    print(f"(b) ImageFolder + DataLoader({args.workers}w)   {b:8.1f} img/s")
    print(f"(c) model alone, batch in memory  {c:8.1f} img/s")
    print(f"(d) (c) in float32                {d:8.1f} img/s")
    print(f"a/b = {a / b:.2f}   a/c = {a / c:.3f}   c/d = {c / d:.2f}")
    if args.fit_images:
        e, e_epochs, epochs = whole_fit(root, args)
        print(f"(e) whole fit, wall time          {e:8.1f} img/s   ({epochs} epochs; alone: {e_epochs:.1f} img/s)")
        print(f"e/c = {e / c:.3f}   (e's epochs)/c = {e_epochs / c:.3f}")


def whole_fit(root: Path, args: argparse.Namespace) -> tuple[float, float, int]:
    """(e): images trained per second of a whole quick-profile fit's wall time, and of its epochs alone;
    its epochs."""
    config = load_config(
        "quick",
        {
            "data.root": str(root),
            "data.image_size": args.image_size,
            "train.model": args.model,
            "train.batch_size": args.batch_size,
            **({"train.epochs": args.fit_epochs} if args.fit_epochs else {}),
            "train.amp": args.amp,
        },
    )
    dataset = load_dataset(root, args.image_size, config.data.variance_threshold, progress=False)
    split = train_val_test_split(dataset.labels, dataset.specimens, 0.15, 0.15, "grouped", 0)
    rng = np.random.default_rng(0)
    keep = {"train": args.fit_images, "val": args.fit_images * 15 // 70, "test": args.fit_images * 15 // 70}
    split = {p: np.sort(rng.permutation(idx)[: keep[p]]) for p, idx in split.items()}
    start = time.perf_counter()
    result = fit(config, dataset, split)
    wall = time.perf_counter() - start
    trained = sum(h.images_per_s * h.seconds for h in result.history)
    return trained / wall, trained / sum(h.seconds for h in result.history), len(result.history)


if __name__ == "__main__":
    main()
