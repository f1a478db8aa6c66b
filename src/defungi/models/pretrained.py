"""Start a model from pretrained weights: its ImageNet weights (see `registry.Pretrained`) or a local
file (a state dict, or a torchvision / timm / defungi checkpoint); the head is always replaced."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn

from defungi.errors import DefungiError
from defungi.models.registry import model_entry


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The model's ImageNet weights, through its registered loader (a download, where the library needs
    one), loaded once while the same model is built again (a cold transfer CV builds Lite0 five times:
    0.09 s each); the tensors are shared, to be copied from (load_backbone), never written."""
    return dict(_imagenet(name))


@functools.lru_cache(maxsize=1)  # one model's at a time: a job that builds several does not keep them all
def _imagenet(name: str) -> dict[str, torch.Tensor]:
    pretrained = model_entry(name).pretrained
    if pretrained is None:
        raise DefungiError(f"model '{name}' has no ImageNet weights here; pass --weights PATH to a saved state dict")
    try:
        return pretrained.loader()
    except DefungiError:
        raise
    except Exception as exc:  # offline: URLError, OSError, huggingface_hub errors...
        why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
        raise DefungiError(
            f"could not load the ImageNet weights of '{name}' ({why}); "
            "this machine may be offline: pass --weights PATH to a saved state dict, or use efficientnet-lite0"
        ) from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: plain, or under 'state_dict' / 'model' (torchvision, timm, defungi
    checkpoints); a 'module.' prefix (DataParallel) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise DefungiError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DefungiError(f"--weights {path}: not a PyTorch weights file ({type(exc).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DefungiError(f"--weights {path}: holds no state dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone(model: nn.Module, model_name: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every weight but the head's (the classifier of model_name's entry) from state (anything
    missing or of another shape is an error), and start the new head at zero: every class equally
    likely at first. (timm's random head init, uniform over +-1/sqrt(classes), turns a pretrained
    backbone's features into logits so large that the first loss is about 5 instead of ln 5 = 1.6.)"""
    head = model_entry(model_name).parts.classifier
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{head}.")}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        example = (
            f"{wrong[0]}: {tuple(state[wrong[0]].shape)} against {tuple(own[wrong[0]].shape)}" if wrong else missing[0]
        )
        raise DefungiError(
            f"{source}: does not fit this model ({len(missing)} weights missing, {len(wrong)} of another shape, "
            f"e.g. {example}); use weights saved from the same architecture"
        )
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    new_head = model.get_submodule(head)
    nn.init.zeros_(new_head.weight)
    nn.init.zeros_(new_head.bias)


def initial_weights(model: nn.Module, model_name: str, weights: str = "", pretrained: bool = False) -> None:
    """Pretrained weights into everything but the head: from a file (weights), or the model's ImageNet
    ones (pretrained); nothing otherwise."""
    if weights:
        load_backbone(model, model_name, read_weights(weights), f"--weights {weights}")
    elif pretrained:
        load_backbone(model, model_name, imagenet_state_dict(model_name), f"the ImageNet weights of {model_name}")


def tail_example(size: int, device: torch.device) -> torch.Tensor:
    """Two random images at size that check a tail (tail_from), from their own generator: the global one
    is left alone."""
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)


def tail_from(model: nn.Module, model_name: str, name: str, example: torch.Tensor) -> nn.Module:
    """The part of the model that runs from its module `name` (included) to the output, over the same
    weights: the head itself, or the modules from one of the split points of model_name's entry (or
    from a module inside one that is an nn.Sequential, e.g. blocks.5) in the order they run,
    flattened before the head. Checked on example inputs against the whole model; a clear error
    where it differs."""
    parts = model_entry(model_name).parts
    where = f"train.train_from '{name}'"
    if not any(name == point or name.startswith(f"{point}.") for point in parts.split_points):
        raise DefungiError(
            f"{where}: {model_name} splits at {', '.join(parts.split_points)} (or inside one that is a sequence)"
        )
    head = model.get_submodule(parts.classifier)
    tail = head if name == parts.classifier else _sequence_from(model, name, head, where)
    inputs: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example)
            same = torch.allclose(tail(inputs[0]), out, rtol=1e-3, atol=1e-4)
    finally:
        handle.remove()
        model.train(training)
    if not same:
        raise DefungiError(
            f"{where}: {type(model).__name__} does not run its modules in order from there; "
            f"use the head, {parts.classifier}"
        )
    return tail


def _sequence_from(model: nn.Module, name: str, head: nn.Module, where: str) -> nn.Sequential:
    """The module `name`, then at each level up the modules after it (each level below the top an
    nn.Sequential, whose modules run in order), up to the head."""
    parent, after, parts = model, [], name.split(".")
    for i, part in enumerate(parts):
        owner = ".".join(parts[:i]) or type(model).__name__
        children = dict(parent.named_children())
        if part not in children:
            raise DefungiError(f"{where}: {owner} has no part '{part}'; use one of {', '.join(children)}")
        if i > 0 and not isinstance(parent, nn.Sequential):
            raise DefungiError(
                f"{where}: the parts of {owner} do not run in order; choose {owner} or a module above it"
            )
        names = list(children)
        after.append([children[n] for n in names[names.index(part) + 1 :]])
        parent = children[part]
    modules = [parent, *(m for level in reversed(after) for m in level)]
    holder = next((m for m in modules if any(sub is head for sub in m.modules())), None)
    if holder is None:
        raise DefungiError(f"{where}: the head does not come after it; choose a module before the head")
    if holder is head:  # a bare linear head takes the pooled map flattened (a head module flattens it itself)
        modules.insert(modules.index(head), nn.Flatten(1))
    return nn.Sequential(*modules)
