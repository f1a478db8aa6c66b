import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from defungi.errors import DefungiError
from defungi.models import create_model, list_models, model_entry
from defungi.models.pretrained import tail_from

# every registered model, and a timm name through its pass-through entry; tiny ones stay tiny
MODELS = [*list_models(), "resnet10t"]
# and two pretrained ones side by side: its head reads both members, not one feature map (models.concat)
BUILT = [*MODELS, "efficientnet-lite0+efficientnet-lite1"]
TINY = {"convmixer": {"dim": 32, "depth": 2}}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=5, **TINY.get(name, {}))


def _inputs_of(model: nn.Module, modules: list[str], x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(what each module receives, what the whole model returns) for x, in eval mode."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(m).register_forward_pre_hook(lambda _m, args, m=m: seen.setdefault(m, args[0]))
        for m in modules
    ]
    with torch.no_grad():
        out = model.eval()(x)
    for hook in hooks:
        hook.remove()
    return [seen[m] for m in modules], out


@pytest.mark.parametrize("name", BUILT)
def test_every_model_shape_finite_and_all_parameters_learn(name: str):
    model = _model(name)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", MODELS)
def test_the_entry_names_the_head_and_the_feature_map_it_reads(name: str):
    model, parts = _model(name).eval(), model_entry(name).parts
    head = model.get_submodule(parts.classifier)
    assert isinstance(head, nn.Linear) and head.out_features == 5
    maps = []
    model.get_submodule(parts.features).register_forward_hook(lambda _m, _i, out: maps.append(out))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        assert maps[0].ndim == 4 and maps[0].shape[-1] < 64  # a feature map, before global pooling
        # the map averaged over space is what the head turns into the logits (Grad-CAM, pooled features)
        assert torch.allclose(head(maps[0].mean((2, 3))), out, atol=1e-5)


@pytest.mark.parametrize("name", BUILT)
def test_every_split_point_reproduces_the_whole_models_logits(name: str):
    model, parts = _model(name).eval(), model_entry(name).parts
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inside = [  # a split inside a sequence of modules: its last one
        f"{point}.{list(dict(model.get_submodule(point).named_children()))[-1]}"
        for point in parts.split_points
        if isinstance(model.get_submodule(point), nn.Sequential)
    ]
    assert parts.split_points[-1] == parts.classifier
    points = [*parts.split_points, *inside]
    inputs, out = _inputs_of(model, points, x)
    for point, received in zip(points, inputs, strict=True):
        tail = tail_from(model, name, point, x[:2])
        with torch.no_grad():
            assert torch.allclose(tail(received), out, atol=1e-5), point


def test_the_entry_says_the_native_input_size_and_normalisation():
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (model_entry("resnet34").input_size, model_entry("resnet34").normalization) == (224, imagenet)
    for variant, side in ((0, 224), (1, 240), (2, 260)):  # timm's pretrained_cfg of tf_efficientnet_lite0/1/2
        entry = model_entry(f"efficientnet-lite{variant}")
        assert (entry.input_size, entry.normalization) == (side, ((0.5,) * 3, (0.5,) * 3))
    assert (model_entry("convmixer").input_size, model_entry("convmixer").normalization) == (None, imagenet)
    assert model_entry("resnet10t").input_size == 176  # timm's pretrained_cfg


def test_the_names_load_without_torch_and_the_cli_offers_them():
    script = (
        "import sys\nfrom defungi.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n"
        "    assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    wide = {**os.environ, "COLUMNS": "1000"}  # argparse wraps help at the terminal's width, also inside names
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=wide)
    assert done.returncode == 0, done.stderr
    assert ", ".join(list_models()) + ", any timm model name, or pretrained ones joined by +" in done.stdout


def test_convmixer_depth_and_head_follow_arguments():
    model = create_model("convmixer", num_classes=3, dim=16, depth=3, kernel_size=5, patch_size=2)
    assert len(model.blocks) == 3 and model.head.out_features == 3
    assert len(create_model("convmixer-16", num_classes=5).blocks) == 16


def test_registry_lists_and_rejects():
    lite = {"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"}
    assert {"resnet34", "convmixer-8", "convmixer-16", *lite} <= set(list_models())
    with pytest.raises(DefungiError, match="unknown model"):
        create_model("no-such-net", num_classes=2)
    with pytest.raises(DefungiError, match="bad arguments"):
        create_model("convmixer", num_classes=2, widht=3)


@pytest.mark.parametrize(
    ("name", "side"), [("efficientnet-lite0", 7), ("efficientnet-lite1", 8), ("efficientnet-lite2", 9)]
)
def test_lite_with_a_pool_border_reads_only_the_inner_cells_of_its_feature_map(name: str, side: int):
    model = create_model(name, num_classes=5, pool_border=0.15).eval()
    entry = model_entry(name)
    x = torch.randn(1, 3, entry.input_size, entry.input_size, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 1280, side, side, generator=torch.Generator().manual_seed(1))  # side: 1/32 of the input

    def logits(where: torch.Tensor | None) -> torch.Tensor:
        """The logits with noise added to the feature map's cells where the mask is true."""
        hook = model.get_submodule(entry.parts.features).register_forward_hook(
            lambda _m, _i, out: out if where is None else out + noise * where
        )
        with torch.no_grad():
            out = model(x)
        hook.remove()
        return out

    ring = torch.ones(side, side, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    assert torch.allclose(logits(ring), logits(None))  # the outer ring of the map is not read
    assert not torch.allclose(logits(~ring), logits(None), atol=1e-3)  # the inner cells are
