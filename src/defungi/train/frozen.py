"""A frozen backbone's pass (train.freeze_backbone): what fits and answers read of each image, in one
forward pass, on the faster of torch and onnxruntime, cached per image.

- One pass: `Readings` returns every reading asked for (the head's input, the refusal detector's
  channel means, ...) from one forward pass that stops at the last of them.
- The faster engine: `FrozenPass.engine` times torch (channels-last, the threads train.runtime
  chooses) against onnxruntime (the same module exported) on a few batches, once per machine, model
  and set of readings, remembers the faster in the user cache and runs there. Both compute in fp32
  (train.loop.inference_precision) and agree to about 1e-6.
- One cache: `FrozenPass.cached` keeps each reading of each image in a `data.store.RowStore` keyed by
  the image's content, in a folder named for the model, its frozen weights, the reading, the
  preprocessing, the view and the precision: adding, removing or renaming images computes only what
  is new, and folds, re-runs and answers share the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn

from defungi.config import Config
from defungi.data.cache import dihedral_nhwc
from defungi.data.scan import default_cache_dir
from defungi.data.store import RowStore
from defungi.models.pretrained import initial_weights, tail_example, tail_from
from defungi.models.registry import create_model, model_args, model_entry
from defungi.train.loop import Preprocess, autocast, inference_precision, module_readings, precision_name
from defungi.train.ood import Reading, model_readings
from defungi.train.runtime import Threads, to_onnx
from defungi.utils import (
    atomic_write_binary,
    atomic_write_json,
    cpu_flags,
    exclusive_lock,
    ort_session,
    prefetched,
    progress_bar,
    run_fixed,
)

log = logging.getLogger(__name__)

BATCH = 32  # images per batch of a pass (benchmarks/lab_loop.py times the model alone at the same)
ENGINE_ENV = "DEFUNGI_ENGINE"  # 'torch' or 'onnxruntime' fixes the engine; unset: the faster measured here
ENGINES = ("torch", "onnxruntime")
PACE = 8  # batches between two choices of a torch pass's threads (about half a minute on 2 cores)


def weights_digest(model: nn.Module, trained: nn.Module | None = None) -> str:
    """A digest of every weight and buffer of model but those of trained (the part that trains): what
    the frozen part computes with."""
    skip = {id(t) for t in trained.state_dict(keep_vars=True).values()} if trained is not None else set()
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if id(tensor) in skip or name.endswith("num_batches_tracked"):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def in_forward_order(model: nn.Module, readings: Iterable[Reading]) -> list[Reading]:
    """The distinct readings in the order a forward pass reaches them (a module's input before its output)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(set(readings), key=lambda r: (order[r.module], r.kind != "input"))


class Readings(nn.Module):
    """uint8 NHWC images -> each reading of model (float32, one row per image), normalised as
    preprocess says, in one forward pass that stops at the last reading."""

    def __init__(self, model: nn.Module, readings: Sequence[Reading], preprocess: Preprocess, channels_last: bool):
        super().__init__()
        self.model, self.readings = model, list(readings)
        self.preprocess, self.channels_last = preprocess, channels_last

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.preprocess.normalized(images)
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        return tuple(module_readings(self.model, [r.hook(self.model) for r in self.readings], x))


class Engine(Protocol):
    name: str

    def __call__(self, images: np.ndarray) -> list[np.ndarray]: ...


class TorchEngine:
    """Readings on torch."""

    name = "torch"

    def __init__(self, module: Readings, device: torch.device, amp: bool) -> None:
        self.module, self.device, self.amp = module.eval(), device, amp

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        with autocast(self.device, inference_precision(self.device, self.amp)):
            return [r.float().cpu().numpy() for r in self.module(x)]


class OnnxEngine:
    """Readings on onnxruntime's CPU provider, from the exported module, BATCH images at a time."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int) -> None:
        self.session = ort_session(path, threads, BATCH)

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        return run_fixed(self.session, images, BATCH)


@functools.lru_cache(maxsize=2)
def onnx_engine(path: Path, threads: int) -> OnnxEngine:
    """The session of an exported pass, opened once per process and kept warm: the probe's (the plan's
    timing) is the folds' pass after it, whose first batch would otherwise wait while onnxruntime lays
    out its memory again (0.3-0.8 s for Lite0 after a cold decode)."""
    return OnnxEngine(path, threads)


def export_readings(module: Readings, path: Path, size: int) -> None:
    """The module as ONNX at path (uint8 NHWC images in, one output per reading), written atomically."""
    names = [f"reading{i}" for i in range(len(module.readings))]
    graph = to_onnx(module, torch.zeros(2, size, size, 3, dtype=torch.uint8), names)
    atomic_write_binary(path, lambda fh: fh.write(graph))


def images_per_s(engine: Engine, images: np.ndarray, repeats: int = 3, warm: bool = False) -> float:
    """Throughput of an engine on a batch of images, after one warm-up call (none where it is warm)."""
    if not warm:
        engine(images)
    start = time.perf_counter()
    for _ in range(repeats):
        engine(images)
    return repeats * len(images) / (time.perf_counter() - start)


CLEAR = 1.5  # onnxruntime this many times torch's images/s on one timed call: no need to time it on three


def engine_rates(on_torch: Engine, on_ort: Engine, images: np.ndarray) -> dict[str, float]:
    """Images/s of both engines on a batch of images. Torch first on an eighth of the batch, which a CPU
    runs at least as fast per image (measured: 60-79 against 35-53 images/s on a quarter; on an Intel
    Xeon with AMX, 62-90 on 4 images against 60 on 32), against one timed call of onnxruntime: where
    that call alone is CLEAR times faster, it settles the choice (noise only slows a call), seconds
    sooner on slow CPUs; else onnxruntime on two more calls (warm: three timed in all, as many as
    without the shortcut), and where torch is still faster, torch on the whole batch too."""
    few = images[: max(1, len(images) // 8)]
    rates = {on_ort.name: images_per_s(on_ort, images, 1), on_torch.name: images_per_s(on_torch, few, 1)}
    if rates[on_ort.name] >= CLEAR * rates[on_torch.name]:
        return rates | {"torch_batch": len(few), "onnxruntime_calls": 1}
    rates[on_ort.name] = images_per_s(on_ort, images, 2, warm=True)
    if rates[on_torch.name] < rates[on_ort.name]:
        return rates | {"torch_batch": len(few), "onnxruntime_calls": 3}
    return rates | {
        on_torch.name: images_per_s(on_torch, images, 1),
        "torch_batch": len(images),
        "onnxruntime_calls": 3,
    }


class FrozenPass:
    """A frozen model's readings of uint8 images (its input size), batch by batch on the faster engine,
    and cached per image (see the module's docstring). name: the architecture and its arguments;
    trained: the part of model that trains (its weights are not the frozen model's)."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        readings: Iterable[Reading],
        preprocess: Preprocess,
        device: torch.device,
        amp: bool = False,
        channels_last: bool = True,
        trained: nn.Module | None = None,
    ) -> None:
        self.readings = in_forward_order(model, readings)
        self.module = Readings(model, self.readings, preprocess, channels_last).eval()
        self.device, self.amp, self.preprocess = device, amp, preprocess
        prep = dataclasses.asdict(preprocess)
        if preprocess.normalize in ("image", "luma"):  # per-image normalisation: mean/std unused
            prep = {k: v for k, v in prep.items() if k not in ("mean", "std")}
        precision = precision_name(device, inference_precision(device, amp))
        self.identity = [name, weights_digest(model, trained), prep, precision]
        self.trained = trained
        self._engine: Engine | None = None
        self._speed: float | None = None

    def _key(self, *what: object) -> str:
        return hashlib.sha1(json.dumps([*self.identity, *what], default=str).encode()).hexdigest()[:16]

    def reading_key(self, reading: Reading, view: int = 0) -> str:
        """The cache folder's name of one reading of one view (0: the image as is)."""
        return self._key(reading.module, reading.kind, view)

    @property
    def speed(self) -> float:
        """Images/s of this pass on its engine: as measured when the engine was chosen (now, where it was fixed)."""
        engine = self.engine
        if self._speed is None:
            self._speed = images_per_s(engine, self._random_batch())
        return self._speed

    def prepare(self) -> None:
        """Choose the engine now (loading its session), so that a model opened while images decode
        starts on them at once (a run on blank images to warm it up cost more than it saved)."""
        self._engine = self.engine

    def _random_batch(self) -> np.ndarray:
        size = self.preprocess.image_size
        return np.random.default_rng(0).integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)

    @property
    def engine(self) -> Engine:
        """The engine this pass runs on (chosen once per process; see the module's docstring)."""
        if self._engine is None:
            self._engine = self._choose()
        return self._engine

    def _fixed(self) -> str:
        """The engine this pass must run on ('': the faster): ENGINE_ENV's, torch off the CPU."""
        fixed = os.environ.get(ENGINE_ENV, "")
        if fixed and fixed not in ENGINES:
            raise ValueError(f"{ENGINE_ENV}={fixed}: use one of {', '.join(ENGINES)}")
        return "torch" if self.device.type != "cpu" else fixed

    def export(self) -> None:
        """Export the pass for onnxruntime into the user cache now, where choosing its engine will need
        it (a CPU, the engine not fixed to torch): e.g. while images decode in other processes. (Its
        session opened and warmed there too, beside the decoding, cost more than it saved after.)"""
        if self._fixed() != "torch":
            path = self._engine_path()
            with exclusive_lock(path.with_suffix(".lock")):
                self._exported(path)

    def _engine_path(self) -> Path:
        """Where the user cache keeps this pass exported (its model, weights, readings, preprocessing)."""
        return default_cache_dir() / "engines" / f"{self._key([tuple(r) for r in self.readings])}.onnx"

    def _exported(self, path: Path) -> Path:
        """path, the pass exported there first if it is not yet (under the caller's lock)."""
        if not path.exists():
            start = time.perf_counter()
            export_readings(self.module, path, self.preprocess.image_size)
            log.info("frozen pass exported for onnxruntime in %.1f s (%s)", time.perf_counter() - start, path)
        return path

    def _choose(self) -> Engine:
        fixed = self._fixed()
        on_torch = TorchEngine(self.module, self.device, self.amp)
        if fixed == "torch":
            return on_torch
        threads = Threads(self.device).choose()
        path = self._engine_path()
        with exclusive_lock(path.with_suffix(".lock")):
            on_ort = onnx_engine(self._exported(path), threads)
            if fixed:
                return on_ort
            choices_path = path.parent / "choices.json"
            choices = json.loads(choices_path.read_text()) if choices_path.exists() else {}
            machine = f"{path.stem} {cpu_flags()} {threads} threads"
            if machine not in choices:
                choices[machine] = engine_rates(on_torch, on_ort, self._random_batch())
                atomic_write_json(choices_path, choices)
            rates = choices[machine]
        chosen = on_ort if rates["onnxruntime"] >= rates["torch"] else on_torch
        self._speed = rates[chosen.name]
        log.info(
            "frozen pass on %s (images/s measured here: torch %.0f%s, onnxruntime %.0f)",
            chosen.name,
            rates["torch"],
            f" on {rates['torch_batch']:.0f} images" if rates.get("torch_batch", BATCH) != BATCH else "",
            rates["onnxruntime"],
        )
        return chosen

    def run(self, batches: Iterable[np.ndarray], n_batches: int, desc: str = "features") -> list[np.ndarray]:
        """Each reading of the uint8 batches, in order (the next batch is prepared while one computes)."""
        engine, threads = self.engine, Threads(self.device)
        out: list[list[np.ndarray]] = [[] for _ in self.readings]
        bar = progress_bar(n_batches, desc)
        for i, batch in enumerate(prefetched(batches)):
            if engine.name == "torch" and i % PACE == 0:
                threads.choose()  # a long pass: leave a core that another process took
            for rows, read in zip(out, engine(batch), strict=True):
                rows.append(read)
            bar.update(1)
        bar.close()
        empty = np.zeros((0,), dtype=np.float32)
        return [np.concatenate(rows) if rows else empty for rows in out]

    def of(
        self, images: np.ndarray, view: int = 0, idx: np.ndarray | None = None, desc: str = "features"
    ) -> list[np.ndarray]:
        """Each reading of the images at idx (default all; N x S x S x 3 uint8, e.g. memory-mapped) as
        their view-th flip/rotation (0: as is)."""
        idx = np.arange(len(images)) if idx is None else idx
        starts = range(0, len(idx), BATCH)
        batches = (dihedral_nhwc(images[idx[i : i + BATCH]], view) for i in starts)
        return self.run(batches, len(starts), desc)

    def missing(self, keys: np.ndarray, view: int = 0) -> int:
        """How many of the images (by content key) lack some reading in the cache."""
        todo = [RowStore(self._folder(r, view)).missing(keys) for r in self.readings]
        return len(np.unique(np.concatenate(todo))) if todo else 0

    def _folder(self, reading: Reading, view: int) -> Path:
        return default_cache_dir() / "features" / self.reading_key(reading, view)

    def cached(
        self,
        images: np.ndarray,
        keys: np.ndarray,
        view: int = 0,
        computed: Callable[[int], None] | None = None,
    ) -> list[np.ndarray]:
        """Each reading of every image (keys: their content, data.store.file_keys), from the cache;
        the images that lack one are passed through the model once for all readings and added.
        computed(n) after a pass over n images."""
        stores = [RowStore(self._folder(r, view)) for r in self.readings]
        with exclusive_lock(default_cache_dir() / "features" / f"{self._key(view)}.lock"):
            todo = np.unique(np.concatenate([s.missing(keys) for s in stores]))
            if len(todo):
                start = time.perf_counter()
                rows = self.of(images, view, todo)
                for store, reading, read in zip(stores, self.readings, rows, strict=True):
                    store.fill(keys[todo], lambda at, read=read: {"rows": read[at]})
                    about = store.folder / "about.json"
                    if not about.exists():
                        atomic_write_json(about, {"reading": list(reading), "view": view, "model": self.identity})
                log.info(
                    "%s of %d images (view %d) in %.0f s on %s, cached in %s",
                    " and ".join(f"the {r.kind} of {r.module}" for r in self.readings),
                    len(todo),
                    view,
                    time.perf_counter() - start,
                    self.engine.name,
                    stores[0].folder.parent,
                )
                if computed is not None:
                    computed(len(todo))
        return [store.get(keys, ["rows"])["rows"] for store in stores]


def frozen_name(model: str, args: dict[str, Any]) -> str:
    """What names a frozen model in the cache's keys: its registry name and all its arguments."""
    return json.dumps([model, model_args(model, args)], sort_keys=True)


def frozen_pass(
    config: Config,
    classes: int,
    preprocess: Preprocess,
    device: torch.device,
    view: int = 0,
    model: nn.Module | None = None,
    trained: nn.Module | None = None,
) -> FrozenPass:
    """The pass of a frozen-backbone config's model (model, default: built with its pretrained weights)
    whose part trained (from train.train_from, default the head) its fits train: for view 0, the input
    of that part and the refusal detector's readings before it (train.ood); for another view, the
    input alone. Fits, the plan's probe and cold-cache counts ask here, so that they share engine and cache."""
    tc = config.train
    start = tc.train_from or model_entry(tc.model).parts.classifier
    if model is None:
        model = create_model(tc.model, num_classes=classes, **tc.model_args)
        initial_weights(model, tc.model, tc.weights, tc.pretrained)
        model = model.to(device, memory_format=torch.channels_last if tc.channels_last else torch.contiguous_format)
    if trained is None:
        trained = tail_from(model, tc.model, start, tail_example(preprocess.image_size, device))
    inside = {id(m) for m in trained.modules()}
    detector = model_readings(model_entry(tc.model).parts) if tc.ood and view == 0 else []
    before = [r for r in detector if id(model.get_submodule(r.module)) not in inside]
    name = frozen_name(tc.model, tc.model_args)
    readings = [Reading(start, "input"), *before]
    return FrozenPass(model.eval(), name, readings, preprocess, device, tc.amp, tc.channels_last, trained)
