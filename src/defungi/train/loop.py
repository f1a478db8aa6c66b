"""The loops: `train_one_epoch` (the only one that steps an optimiser) and `evaluate`, over batch
sources (images, or a frozen backbone's cached output). No argument parsing, no file I/O."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from defungi.config import TrainConfig
from defungi.data.augment import dihedral
from defungi.stats.metrics import mean_nll, weighted
from defungi.utils import progress_bar

IMAGE_STD_FLOOR = 0.02  # keeps blank patches from being amplified into noise


@dataclass(frozen=True)
class Preprocess:
    """What a model expects: input size and the normalisation it was trained with.

    normalize="dataset" uses the training set's channel mean/std; "image" standardises every
    image by its own channel mean/std, which removes the stain and illumination cast of a slide
    (the cue that does not carry over to unseen specimens); "luma" uses one mean/std per image
    for all channels, removing brightness and contrast but keeping the hue.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalize: str = "dataset"

    def to_tensor(self, batch: np.ndarray, device: torch.device, channels_last: bool = True) -> torch.Tensor:
        """uint8 NHWC batch -> normalised float NCHW on device (channels-last strides for free)."""
        x = self.normalized(torch.from_numpy(np.require(batch, requirements=("C", "W"))).to(device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()

    def normalized(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC tensor -> normalised float NCHW (also traced into an exported model)."""
        x = batch.permute(0, 3, 1, 2).float() / 255
        if self.normalize == "image":
            return (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + IMAGE_STD_FLOOR)
        if self.normalize == "luma":
            return (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + IMAGE_STD_FLOOR)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)


def batches(
    images: np.ndarray, labels: np.ndarray, order: np.ndarray, batch_size: int, drop_last: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images, labels) in the given order; sorted fancy indexing keeps memory-mapped reads local."""
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]


@functools.cache  # asked once per batch by autocast; the answer is the machine's
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast is faster."""
    native = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return torch.backends.mkldnn.is_available() and any(check is not None and check() for check in native)


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The mixed-precision type: bf16 on CUDA where supported (else fp16) and on CPUs with native bf16;
    None (full fp32) when disabled or where it would be slower."""
    if enabled and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if enabled and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def precision_name(device: torch.device, enabled: bool) -> str:
    """What autocast(device, enabled) computes in: 'float32', 'bfloat16' or 'float16'."""
    return str(autocast_dtype(device, enabled) or torch.float32).removeprefix("torch.")


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast to autocast_dtype(device, enabled), or nothing."""
    dtype = autocast_dtype(device, enabled)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def inference_precision(device: torch.device, enabled: bool) -> bool:
    """Whether answers (no gradient) use mixed precision: on GPUs; never on CPUs, where they are
    computed in fp32 like the exported ONNX model, so that both backends decide alike."""
    return enabled and device.type != "cpu"


class Batch(NamedTuple):
    """One training batch, on the device and ready for the forward function."""

    inputs: torch.Tensor
    targets: torch.Tensor  # class indices, or soft labels (MixUp/CutMix)
    labels: torch.Tensor  # class indices, for the accuracy


@dataclass
class TrainStep:
    """What one optimisation step needs besides the batch: optimiser, schedule, loss, device,
    precision (with loss scaling for fp16), and a hook after every step (e.g. a weight average)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    criterion: nn.Module
    device: torch.device
    amp: bool = False
    scaler: torch.amp.GradScaler | None = None
    on_step: Callable[[], None] | None = None

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Gradients of loss, then one step of the optimiser and the schedule (loss scaled when the
        scaler is enabled: fp16 gradients would underflow)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.on_step is not None:
            self.on_step()


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    head: str | None = None,
    backbone_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """AdamW or SGD with Nesterov momentum; no weight decay on norms and biases; frozen weights left
    out. With the head's name, the other (backbone) weights learn at backbone_lr_scale x lr."""
    groups = []
    for backbone in (False, True):
        params = [
            p
            for n, p in model.named_parameters()
            if p.requires_grad and (head is not None and not n.startswith(f"{head}.")) == backbone
        ]
        rate = lr * (backbone_lr_scale if backbone else 1.0)
        groups += [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lr": rate},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": rate},
        ]
    groups = [g for g in groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer '{name}'; use adamw or sgd")


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle (peaking at each parameter group's rate), or linear warm-up then cosine decay,
    stepped once per batch."""
    total_steps = max(total_steps, 10)  # one-cycle needs a few steps per phase (tiny test fits)
    if name == "onecycle":
        peaks = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peaks, total_steps=total_steps, pct_start=warmup_fraction
        )
    if name == "cosine":
        warmup = max(1, int(total_steps * warmup_fraction))
        return torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup)),
            ],
            milestones=[warmup],
        )
    raise ValueError(f"unknown schedule '{name}'; use onecycle or cosine")


def weight_average(model: nn.Module, tc: TrainConfig) -> ModelEmaV3 | None:
    """The exponential moving average of model's weights that train.ema_decay asks for (None: none)."""
    return ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True) if tc.ema_decay > 0 else None


def train_step(
    tc: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    device: torch.device,
    ema: ModelEmaV3 | None = None,
) -> TrainStep:
    """The optimisation step a fit takes (and the plan's probe times): tc's schedule over total_steps,
    label-smoothed loss, precision, and the weight average's update."""
    scheduler = build_scheduler(optimizer, tc.schedule, total_steps, tc.warmup_fraction)
    # autocast decides per device (bf16/fp16 on CUDA, bf16 on CPUs with native bf16); fp16 needs loss scaling
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, tc.amp) == torch.float16)
    return TrainStep(
        optimizer,
        scheduler,
        nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing),
        device,
        tc.amp,
        scaler,
        on_step=(lambda: ema.update(model, step=scheduler.last_epoch)) if ema is not None else None,
    )


def train_one_epoch(
    model: nn.Module, batches: Iterable[Batch], n_batches: int, step: TrainStep, desc: str = "train"
) -> dict[str, float]:
    """One pass of model over batches (images, or a frozen backbone's cached output: see
    image_batches and feature_batches); returns mean loss, accuracy, images and seconds."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = progress_bar(n_batches, desc)
    for x, target, y in batches:
        with autocast(step.device, step.amp):
            logits = model(x)
            loss = step.criterion(logits.float(), target)
        step.backward_and_step(loss)
        n = len(y)
        total_loss += loss.item() * n
        correct += int((logits.argmax(1) == y).sum())
        seen += n
        bar.update(1)
        bar.set_postfix_str(f"loss {total_loss / seen:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen, "seconds": seconds}


def image_batches(
    data: Iterable[tuple[np.ndarray, np.ndarray]],
    preprocess: Preprocess,
    device: torch.device,
    channels_last: bool = True,
    augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Iterator[Batch]:
    """Training batches from (uint8 images, labels): normalised, then augment(images, labels) ->
    (images, targets), e.g. flips and MixUp."""
    for x_u8, y_np in data:
        y = torch.from_numpy(y_np).to(device, non_blocking=True)
        x = preprocess.to_tensor(x_u8, device, channels_last)
        x, target = augment(x, y) if augment is not None else (x, y)
        yield Batch(x, target, y)


def feature_rows(
    features: Sequence[np.ndarray],
    idx: np.ndarray,
    device: torch.device,
    views: np.ndarray | None = None,
    channels_last: bool = True,
) -> torch.Tensor:
    """Rows idx of cached module inputs (features[v]: those of every image's v-th flip/rotation), each
    of its view (default 0: the image as is), on device (channels-last feature maps where asked)."""
    views = np.zeros(len(idx), dtype=int) if views is None else views
    batch = np.empty((len(idx), *features[0].shape[1:]), dtype=np.float32)
    for view in np.unique(views):
        batch[views == view] = features[view][idx[views == view]]
    x = torch.from_numpy(batch).to(device)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and channels_last else x


def feature_batches(
    features: Sequence[np.ndarray],
    labels: np.ndarray,
    order: np.ndarray,
    views: np.ndarray,
    batch_size: int,
    device: torch.device,
    channels_last: bool = True,
) -> Iterator[Batch]:
    """Training batches of cached module inputs: images order[i] as their views[i], whole batches
    only, each read in index order (memory-mapped reads stay local)."""
    for start in range(0, len(order) - batch_size + 1, batch_size):
        pick = np.argsort(order[start : start + batch_size]) + start
        idx = order[pick]
        y = torch.from_numpy(labels[idx]).to(device)
        yield Batch(feature_rows(features, idx, device, views[pick], channels_last), y, y)


def image_inputs(
    images: np.ndarray,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int,
    channels_last: bool = True,
    idx: np.ndarray | None = None,
) -> Iterator[torch.Tensor]:
    """images (those at idx, default all) in order, normalised, batch by batch."""
    order = np.arange(len(images)) if idx is None else idx
    for start in range(0, len(order), batch_size):
        yield preprocess.to_tensor(images[order[start : start + batch_size]], device, channels_last)


@torch.no_grad()
def probabilities(
    model: nn.Module,
    inputs: Iterable[torch.Tensor],
    n_batches: int,
    device: torch.device,
    amp: bool = False,
    tta: bool = False,
    desc: str = "predict",
    class_weights: np.ndarray | None = None,
) -> np.ndarray:
    """Class probabilities of model for batches of inputs (images, or cached module inputs), in mixed
    precision only on GPUs (see inference_precision); tta
    averages the 8 flips/rotations; class_weights (see prior_weights) rescale and renormalise them."""
    model.eval()
    out = []
    bar = progress_bar(n_batches, desc)
    for x in inputs:
        with autocast(device, inference_precision(device, amp)):
            views = range(8) if tta else range(1)
            probs = sum(F.softmax(model(dihedral(x, k)).float(), dim=1) for k in views) / len(views)
        out.append(probs.cpu().numpy())
        bar.update(1)
    bar.close()
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return weighted(np.concatenate(out), class_weights)


def predict_proba(
    model: nn.Module,
    images: np.ndarray,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 128,
    tta: bool = False,
    amp: bool = False,
    channels_last: bool = True,
    desc: str = "predict",
    class_weights: np.ndarray | None = None,
) -> np.ndarray:
    """Class probabilities for uint8 NHWC images; tta averages the 8 flips/rotations.

    class_weights (see prior_weights) rescale the probabilities and renormalise them.
    """
    inputs = image_inputs(images, preprocess, device, batch_size, channels_last)
    return probabilities(model, inputs, -(-len(images) // batch_size), device, amp, tta, desc, class_weights)


class _Enough(Exception):
    """Raised by a hook that has what it came for: the rest of the forward pass is not needed."""


def module_rows(tensor: torch.Tensor, channel_means: bool = False) -> torch.Tensor:
    """A module's input or output in float32, one entry per image: as it is, or with channel_means
    averaged over its feature map."""
    x = tensor.float()
    return x.mean(tuple(range(2, x.dim()))) if channel_means and x.dim() > 2 else x


def module_readings(model: nn.Module, modules: Sequence[tuple[nn.Module, bool]], x: torch.Tensor) -> list[torch.Tensor]:
    """What each of modules receives (e.g. the head: the pooled features), or where its flag is set the
    channel means of what it returns, when model runs on x: float32, one row per input. The forward
    pass stops at the last of them, which it must reach last (also when traced for ONNX: the graph
    ends there)."""
    out: dict[int, torch.Tensor] = {}

    def keep(i: int, tensor: torch.Tensor) -> None:
        out[i] = module_rows(tensor, modules[i][1])
        if i == len(modules) - 1:
            raise _Enough

    hooks = [
        module.register_forward_hook(lambda _m, _args, output, i=i: keep(i, output))
        if output_means
        else module.register_forward_pre_hook(lambda _m, args, i=i: keep(i, args[0]))
        for i, (module, output_means) in enumerate(modules)
    ]
    try:
        with contextlib.suppress(_Enough):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    if len(out) != len(modules):
        raise ValueError(f"modules not each reached once before the last: {sorted(out)} of {len(modules)}")
    return [out[i] for i in range(len(modules))]


@torch.no_grad()
def hooked_inputs(
    model: nn.Module,
    modules: Sequence[tuple[nn.Module, bool]],
    inputs: Iterable[torch.Tensor],
    n_batches: int,
    device: torch.device,
    amp: bool = False,
) -> list[np.ndarray]:
    """module_readings of model for batches of inputs (images, or cached module inputs), as arrays."""
    if not modules:
        return []
    model.eval()
    out: list[list[np.ndarray]] = [[] for _ in modules]
    bar = progress_bar(n_batches, "features")
    for x in inputs:
        with autocast(device, inference_precision(device, amp)):
            for rows, read in zip(out, module_readings(model, modules, x), strict=True):
                rows.append(read.cpu().numpy())
        bar.update(1)
    bar.close()
    return [np.concatenate(rows) if rows else np.zeros((0,), dtype=np.float32) for rows in out]


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 128,
    tta: bool = False,
    amp: bool = False,
    channels_last: bool = True,
    class_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Probabilities and mean cross-entropy loss on a labelled set."""
    probs = predict_proba(
        model,
        images,
        preprocess,
        device,
        batch_size,
        tta,
        amp,
        channels_last,
        desc="evaluate",
        class_weights=class_weights,
    )
    return probs, mean_nll(probs, labels)
