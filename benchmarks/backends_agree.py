"""Do the two backends give a lab the same answers? PyTorch (the run folder) against onnxruntime (its
exported model) on N real images, through `defungi predict`'s own path: every image's decision,
prediction set and probabilities, and every specimen's answer, compared side by side.

    python benchmarks/backends_agree.py RUN --data DIR [--images 500] [--onnx model.onnx]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from defungi.serve.export import export_onnx
from defungi.serve.predict import expand_paths, predict_files
from defungi.utils import cpu_flags


def sample(data: Path, n: int) -> list[Path]:
    """n images spread evenly over the folder's sorted files (every class, many specimens)."""
    files = expand_paths([data])
    return [files[i] for i in np.linspace(0, len(files) - 1, min(n, len(files))).astype(int)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--onnx", help="an exported model of RUN (default: export one to a temporary file)")
    args = parser.parse_args()
    files = sample(Path(args.data), args.images)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = Path(args.onnx) if args.onnx else export_onnx(args.run, Path(tmp) / "model.onnx").path
        answers, seconds = {}, {}
        for backend, source in (("torch", args.run), ("onnx", onnx)):
            start = time.perf_counter()
            answers[backend] = predict_files(source, files, backend, per_specimen=True)
            seconds[backend] = time.perf_counter() - start
    a, b = answers["torch"], answers["onnx"]
    rows = [(x, y) for x, y in zip(a.rows, b.rows, strict=True) if x.class_ is not None]
    classes = a.classes
    diff = max(abs(x.probabilities[c] - y.probabilities[c]) for x, y in rows for c in classes)
    same = {key: sum(getattr(x, key) == getattr(y, key) for x, y in rows) for key in ("class_", "decision", "set")}
    specimens = [(x, y) for x, y in zip(a.specimens, b.specimens, strict=True) if x.answer is not None]
    same_answers = sum(x.answer == y.answer for x, y in specimens)
    print(f"CPU flags: {cpu_flags()}")
    print(f"{len(rows)} images classified (of {len(files)}), {len(specimens)} specimens")
    for key, count in same.items():
        print(f"  same {key}: {count}/{len(rows)}")
    print(f"  same specimen answer: {same_answers}/{len(specimens)}")
    print(f"  largest |difference| of a probability: {diff:.2e}")
    print(f"  seconds: torch {seconds['torch']:.1f}, onnx {seconds['onnx']:.1f}")


if __name__ == "__main__":
    main()
