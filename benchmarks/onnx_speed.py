"""onnxruntime against eager PyTorch on the same real images, side by side in one run.

Exports the run's model (to a temporary file), prints the largest difference of the two backends'
probabilities on N real images, then each backend's images/s on the same batches with the same
number of threads, and the ratio (the aim: onnxruntime >= 1.5x). The CPU's AVX-512 flags are
printed beside the times.

    python benchmarks/onnx_speed.py RUN --data DIR [--images 100 --batch-size 32 --repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defungi.data.cache import decode_one
from defungi.serve.export import export_onnx
from defungi.serve.lite import onnx_predictor
from defungi.serve.predict import expand_paths
from defungi.serve.predictor import torch_predictor
from defungi.utils import cpu_flags


def images_per_s(scores, images: np.ndarray, batch_size: int, repeats: int) -> float:
    """Best of repeats: images/s of scores() over images in batches (one warm-up batch first)."""
    scores(images[:batch_size], False)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            scores(images[i : i + batch_size], False)
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True, help="a folder of images (e.g. the DeFungi folder)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    pytorch = torch_predictor(args.run, "cpu")
    files = expand_paths([args.data])
    picked = [files[i] for i in np.linspace(0, len(files) - 1, args.images).astype(int)]
    images = np.stack([decode_one(f, pytorch.image_size)[0] for f in picked])
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(args.run, Path(tmp) / "model.onnx", n_check=8)
        onnx = onnx_predictor(exported.path, threads=threads)
        diff = np.abs(onnx.scores(images, False).probabilities - pytorch.scores(images, False).probabilities).max()
        print(f"{args.run}: {len(images)} real images from {args.data}, opset {exported.opset}")
        print(f"max abs difference of probabilities, onnxruntime vs PyTorch: {diff:.2e}")
        fast = images_per_s(onnx.scores, images, args.batch_size, args.repeats)
    eager = images_per_s(pytorch.scores, images, args.batch_size, args.repeats)
    print(f"{pytorch.image_size} px, batch {args.batch_size}, {threads} threads; CPU: {cpu_flags()}")
    print(f"eager PyTorch: {eager:8.1f} images/s")
    print(f"onnxruntime:   {fast:8.1f} images/s")
    print(f"ratio onnxruntime / PyTorch: {fast / eager:.2f}x")


if __name__ == "__main__":
    main()
