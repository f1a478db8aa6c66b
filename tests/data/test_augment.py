import numpy as np
import torch

from defungi.data.augment import augment_batch, balanced_order, dihedral


def test_dihedral_gives_eight_distinct_views():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(views) == 8


def test_balanced_order_oversamples_minorities():
    labels = np.array([0] * 90 + [1] * 10)
    order = balanced_order(labels, 100, np.random.default_rng(0))
    counts = np.bincount(labels[order])
    assert abs(counts[0] - counts[1]) <= 1
    assert len(set(order[labels[order] == 0])) == counts[0]  # majority images are not repeated


def test_augment_levels_keep_shape_and_change_pixels():
    x = torch.randn(6, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, "none", g), x)
    for level in ("basic", "strong"):
        y = augment_batch(x, level, g)
        assert y.shape == x.shape and not torch.allclose(y, x) and torch.isfinite(y).all()


def test_mix_batch_blends_targets_consistently():
    from defungi.data.augment import mix_batch

    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 4
    for mode in ("mixup", "cutmix"):
        mixed, target = mix_batch(x, y, 4, mode, 0.4, torch.Generator().manual_seed(1))
        assert mixed.shape == x.shape and target.shape == (8, 4)
        assert torch.allclose(target.sum(1), torch.ones(8))
    _, hard = mix_batch(x, y, 4, "none", 0.4, torch.Generator())
    assert torch.equal(hard.argmax(1), y)


def test_augmentation_stays_on_the_batch_device():
    """Random draws come from a CPU generator; they must move to the batch's device (CUDA in
    training on a GPU). The meta device stands in for CUDA: mixing devices fails on both."""
    from defungi.data.augment import mix_batch

    x = torch.zeros(4, 3, 8, 8, device="meta")
    g = torch.Generator().manual_seed(0)
    for level in ("basic", "strong"):
        assert augment_batch(x, level, g).device.type == "meta"
    for mode in ("mixup", "cutmix"):
        mixed, target = mix_batch(x, torch.zeros(4, dtype=torch.long, device="meta"), 5, mode, 0.4, g)
        assert mixed.device.type == target.device.type == "meta"
