import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oal.config import KNNConfig
from oal.knn import _index, kth_distance, sample_classes, sample_outliers, scale_to_anchors


def _clusters(c=2, n=120, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(c, 1, d, generator=g), dim=-1)
    return centres + 0.15 * torch.randn(c, n, d, generator=g)  # (C, N, D)


CFG = KNNConfig(k=10, select=10, sigma=0.07, rounds=4, pic_nums=3, candidates=200, keep_per_point=2)


def test_outliers_lie_beyond_held_out_id_points():
    data = _clusters()
    train, held = data[:, :90], data[:, 90:]
    out = sample_outliers(train, CFG, seed=0)
    assert out.shape == (2, 4 * 3 * 2, 8)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 24), atol=1e-5)
    for c in range(2):
        index = _index(F.normalize(train[c], dim=-1).numpy(), use_gpu=False)
        d_out = kth_distance(index, out[c].numpy(), CFG.k)
        d_held = kth_distance(index, F.normalize(held[c], dim=-1).numpy(), CFG.k)
        # the kept outliers are farther from the class than ID points it has never seen
        assert np.median(d_out) > np.percentile(d_held, 90)


def test_seeded_and_anchor_scaled():
    data = _clusters()
    a = sample_outliers(data, CFG, seed=3)
    assert torch.equal(a, sample_outliers(data, CFG, seed=3))
    assert not torch.equal(a, sample_outliers(data, CFG, seed=4))
    scaled = sample_outliers(data, CFG, seed=3, anchor_norms=torch.tensor([2.0, 5.0]))
    assert torch.allclose(scaled.norm(dim=-1).mean(1), torch.tensor([2.0, 5.0]), atol=1e-4)
    with pytest.raises(ValueError, match="anchor norms"):
        sample_outliers(data, CFG, seed=3, anchor_norms=torch.ones(3))


def test_bad_settings_are_named():
    data = _clusters(n=20)
    with pytest.raises(ValueError, match="knn.k=300.*per_class_cap"):
        sample_outliers(data, KNNConfig(), seed=0)
    with pytest.raises(ValueError, match="knn.pic_nums"):
        sample_outliers(data, KNNConfig(k=5, select=4, pic_nums=5), seed=0)
    with pytest.raises(ValueError, match=r"\[C, N, D\]"):
        sample_outliers(data[0], CFG, seed=0)


def test_classes_sampled_apart_equal_all_at_once():
    """Each class has its own seeded stream: blocks of classes sampled separately (as Ray tasks do) and put back
    in order give exactly the outliers of one pass over every class, whatever the split."""
    data = _clusters(c=5, n=60)
    whole = sample_classes(data, CFG, seed=7)
    assert whole.shape == (5, 24, 8)
    for blocks in ([range(0, 2), range(2, 5)], [range(0, 1), range(1, 3), range(3, 5)], [range(0, 0), range(0, 5)]):
        assert torch.equal(torch.cat([sample_classes(data, CFG, seed=7, classes=b) for b in blocks]), whole)
    assert sample_classes(data, CFG, seed=7, classes=range(3, 3)).shape == (0, 24, 8)
    # a class sampled alone gets the same outliers
    assert torch.equal(sample_classes(data, CFG, seed=7, classes=range(4, 5))[0], whole[4])
    assert torch.equal(scale_to_anchors(whole, torch.full((5,), 3.0)), 3.0 * whole)
