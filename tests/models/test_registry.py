import pytest
import torch

from defungi.errors import DefungiError
from defungi.models import create_model, list_models


@pytest.mark.parametrize("name", ["resnet34", "resnet18", "convmixer-8", "convmixer-16", "convmixer", "resnet10t"])
def test_every_model_shape_finite_and_all_parameters_learn(name: str):
    kwargs = {"dim": 32, "depth": 2} if name == "convmixer" else {}
    model = create_model(name, num_classes=5, **kwargs)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_convmixer_depth_and_head_follow_arguments():
    model = create_model("convmixer", num_classes=3, dim=16, depth=3, kernel_size=5, patch_size=2)
    assert len(model.blocks) == 3 and model.head.out_features == 3
    assert len(create_model("convmixer-16", num_classes=5).blocks) == 16


def test_registry_lists_and_rejects():
    assert {"resnet34", "convmixer-8", "convmixer-16"} <= set(list_models())
    with pytest.raises(DefungiError, match="unknown model"):
        create_model("no-such-net", num_classes=2)
    with pytest.raises(DefungiError, match="bad arguments"):
        create_model("convmixer", num_classes=2, widht=3)
