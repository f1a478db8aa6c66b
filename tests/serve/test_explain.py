from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from defungi.cli import main
from defungi.models import create_model, model_entry
from defungi.models.ensemble import Ensemble
from defungi.serve.explain import cam_layers, gradcam
from defungi.train.loop import Preprocess
from tests.conftest import TinyRun, write_folder


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {}),
        ("convmixer", {"dim": 8, "depth": 2, "kernel_size": 3, "patch_size": 4}),
        ("efficientnet-lite0", {}),
    ],
)
def test_gradcam_maps_of_each_family_cover_the_image(name: str, kwargs: dict):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **kwargs).eval()
    layer = cam_layers(model, model_entry(name).parts.features)[0]
    seen = []
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    trained = SimpleNamespace(
        model=model,
        preprocess=Preprocess(32, (0.5,) * 3, (0.25,) * 3),
        device=torch.device("cpu"),
        info={"model_name": name},
    )
    cams = gradcam(SimpleNamespace(trained=trained), images, [0, 2])
    hook.remove()
    assert len(seen[0]) == 4 and seen[0][-1] < 32  # a feature map, before global pooling
    assert cams.shape == (2, 32, 32) and np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1


def test_every_member_of_a_cross_validated_model_is_explained():
    members = [create_model("convmixer", 3, dim=8, depth=1, kernel_size=3, patch_size=4) for _ in range(3)]
    layers = cam_layers(Ensemble(members), model_entry("convmixer").parts.features)
    assert [id(layer) for layer in layers] == [id(m.blocks) for m in members]


def test_explain_writes_a_figure_per_classified_image(tiny_run: TinyRun, tmp_path: Path, capsys):
    held = write_folder(tmp_path / "held", samples_per_class=1, patches=2, seed=3)
    assert main(["explain", str(tiny_run.run), str(held), "--out", str(tmp_path / "why")]) == 0
    assert "6 Grad-CAM figures" in capsys.readouterr().out  # 3 classes x 2 patches; the blank field is not explained
    figures = sorted((tmp_path / "why").glob("*.gradcam.png"))
    assert len(figures) == 6 and figures[0].name == "H1_1a_1.gradcam.png" and figures[0].stat().st_size > 5000
