"""Heads on one shared frozen trunk answer as the ensemble of the whole models would, with one trunk pass."""

import copy

import pytest
import torch

from defungi.models import create_model
from defungi.models.ensemble import Ensemble, SharedTrunk, members, shared_trunk

MIXER = {"dim": 8, "depth": 2, "kernel_size": 3, "patch_size": 4}


def _folds(n: int) -> list[torch.nn.Module]:
    """n models with one backbone and heads of their own, as the folds of a frozen-backbone CV."""
    torch.manual_seed(0)
    base = create_model("convmixer", num_classes=3, **MIXER).eval()
    folds = []
    for k in range(n):
        fold = copy.deepcopy(base)
        torch.nn.init.normal_(fold.head.weight, std=1.0, generator=torch.Generator().manual_seed(k))
        folds.append(fold)
    return folds


@pytest.mark.parametrize("n", [1, 3])
def test_heads_on_a_shared_trunk_answer_as_the_ensemble_of_whole_models(n: int):
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    whole = Ensemble(_folds(n)) if n > 1 else _folds(1)[0]
    folds = _folds(n)
    shared = shared_trunk(folds[0], [f.state_dict() for f in folds], "head")
    assert isinstance(shared, SharedTrunk) and len(shared.heads) == n
    calls: list[int] = []
    shared.trunk.stem.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        assert torch.allclose(shared(x), whole(x), atol=1e-6)
    assert calls == [1]  # the trunk ran once for every head
    assert members(shared) == [shared.trunk] and shared.trunk.get_submodule("blocks.0") is not None


def test_models_whose_frozen_weights_differ_share_no_trunk():
    folds = _folds(2)
    with torch.no_grad():
        folds[1].stem[0].weight.add_(0.1)
    assert shared_trunk(folds[0], [f.state_dict() for f in folds], "head") is None
