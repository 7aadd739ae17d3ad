import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oal.config import KNNConfig
from oal.knn import _index, class_generator, kth_distance, sample_classes, sample_outliers, scale_to_anchors


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


def _circle(degrees) -> torch.Tensor:
    a = torch.tensor(degrees, dtype=torch.float64) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], -1).float()  # (N, 2) unit vectors


def test_kth_distance_by_hand():
    index = _index(np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [-10.0, 0.0]], dtype=np.float32), use_gpu=False)
    q = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    # from (0, 0): 0, 3, 4, 10; from (3, 4): 4, 3, 5, sqrt(13^2 + 4^2)
    assert kth_distance(index, q, 1).tolist() == pytest.approx([0.0, 3.0], abs=1e-5)
    assert kth_distance(index, q, 2).tolist() == pytest.approx([3.0, 4.0], abs=1e-5)
    assert kth_distance(index, q, 3).tolist() == pytest.approx([4.0, 5.0], abs=1e-5)
    assert kth_distance(index, q.astype(np.float64), 4).tolist() == pytest.approx([10.0, np.hypot(13, 4)], abs=1e-4)
    assert _index(np.eye(3), use_gpu=True).ntotal == 3  # no GPU (or no faiss-gpu): the CPU index


def test_boundary_skips_each_points_own_match():
    """Every ID point finds itself first (distance 0), so a point's K-th neighbour among the others is the
    (K+1)-th hit. On a circle: a dense arc at 0-20 degrees, a point P at 60 and a pair Q at 180/182. With K=2 the
    pair lies farthest from its 2nd other neighbour (P, 118 degrees away); P's 1st other neighbour is the
    farthest (40 degrees): counting the self-match as a neighbour would pick P. The kept outliers are small
    perturbations (sigma 0.01) of boundary points, so they lie at the pair."""
    pts = _circle([0, 5, 10, 15, 20, 60, 180, 182])
    for select in (1, 2):
        cfg = KNNConfig(k=2, select=select, sigma=0.01, rounds=3, pic_nums=1, candidates=6, keep_per_point=2)
        out = sample_classes(pts.unsqueeze(0), cfg, seed=0)[0]  # (6, 2)
        angles = torch.rad2deg(torch.atan2(out[:, 1], out[:, 0])) % 360
        assert out.shape == (6, 2) and ((angles - 181).abs() < 5).all(), angles
    # K=1: P's nearest other point is the farthest (40 degrees); by the 2nd other neighbour the pair would win
    # (P, 120 degrees away), by the point itself (distance 0 for all) the first point
    cfg = KNNConfig(k=1, select=1, sigma=0.01, rounds=2, pic_nums=1, candidates=6, keep_per_point=3)
    out = sample_classes(pts.unsqueeze(0), cfg, seed=0)[0]
    angles = torch.rad2deg(torch.atan2(out[:, 1], out[:, 0])) % 360
    assert ((angles - 60).abs() < 5).all(), angles


def test_every_bad_setting_has_its_own_message():
    data = _clusters(n=20)
    ok = dict(k=5, select=4, rounds=1, pic_nums=2, candidates=4, keep_per_point=2, sigma=0.1)
    cases = [(dict(k=20), r"knn.k=20 must be smaller than the ID points per class \(20\); lower knn.k or raise "
                          r"embeddings.per_class_cap"),
             (dict(select=21), r"knn.select=21 exceeds the ID points per class \(20\)"),
             (dict(pic_nums=5), r"knn.pic_nums=5 exceeds knn.select=4"),
             (dict(keep_per_point=5), r"knn.keep_per_point=5 exceeds knn.candidates=4"),
             (dict(k=0), r"knn.k must be >= 1"), (dict(rounds=0), r"knn.rounds must be >= 1"),
             (dict(pic_nums=0), r"knn.pic_nums must be >= 1"), (dict(keep_per_point=0), r"knn.keep_per_point must be >= 1"),
             (dict(select=0, pic_nums=0), r"knn.select must be >= 1"),
             (dict(candidates=0, keep_per_point=0), r"knn.candidates must be >= 1"),
             (dict(sigma=0.0), r"knn.sigma=0.0 must be > 0"), (dict(sigma=-1.0), r"knn.sigma=-1.0 must be > 0")]
    for change, message in cases:
        with pytest.raises(ValueError, match=f"^{message}$"):
            sample_outliers(data, KNNConfig(**{**ok, **change}), seed=0)
    # the limits themselves are allowed
    out = sample_outliers(data, KNNConfig(**{**ok, "k": 19, "select": 20, "pic_nums": 20, "candidates": 2,
                                             "keep_per_point": 2}), seed=0)
    assert out.shape == (2, 1 * 20 * 2, 8)
    with pytest.raises(ValueError, match=r"got shape \(2, 20, 8, 1\)"):
        sample_outliers(data.unsqueeze(-1), CFG, seed=0)


def test_class_streams_and_anchor_scaling():
    a, b = torch.rand(5, generator=class_generator(3, 1)), torch.rand(5, generator=class_generator(3, 1))
    assert torch.equal(a, b)  # a class's stream is fixed by (seed, class)
    assert not torch.equal(a, torch.rand(5, generator=class_generator(3, 2)))
    assert not torch.equal(a, torch.rand(5, generator=class_generator(4, 1)))
    assert not torch.equal(torch.rand(5, generator=class_generator(1, 3)), a)  # (seed, class), not seed + class
    out = torch.randn(3, 4, 2)
    assert scale_to_anchors(out, None) is out
    assert torch.equal(scale_to_anchors(out, torch.tensor([1.0, 2.0, 3.0])),
                       out * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1))
    assert scale_to_anchors(out.double(), torch.ones(3, dtype=torch.int64)).dtype == torch.float64
    with pytest.raises(ValueError, match=r"anchor norms must be \[C=3\]; got \(3, 1\)"):
        scale_to_anchors(out, torch.ones(3, 1))
    data = _clusters(c=3, n=40)
    empty = sample_classes(data, CFG, seed=0, classes=range(1, 1))
    assert empty.shape == (0, 24, 8) and empty.dtype == data.dtype


def _reference_class(feats: torch.Tensor, cfg: KNNConfig, seed: int, c: int) -> torch.Tensor:
    """sample_class written again with brute-force distances (torch.cdist) instead of faiss, and the class's own
    stream derived here from (seed, class) as the module documents it."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, c]).generate_state(1, np.uint64)[0]))
    x = F.normalize(feats.float(), dim=-1)  # (N, D)
    d = x.shape[1]
    own = torch.cdist(x, x).sort(1).values[:, cfg.k]  # K-th neighbour among the others (index 0: itself)
    boundary = torch.argsort(own, descending=True)[: cfg.select]
    kept = []
    for _ in range(cfg.rounds):
        pick = boundary[torch.randperm(cfg.select, generator=gen)[: cfg.pic_nums]]
        noise = torch.randn(cfg.pic_nums, cfg.candidates, d, generator=gen)  # an independent draw per point
        cand = F.normalize(x[pick].unsqueeze(1) + cfg.sigma * noise, dim=-1)  # (P, M, D)
        score = torch.cdist(cand.reshape(-1, d), x).sort(1).values[:, cfg.k - 1].view(cfg.pic_nums, cfg.candidates)
        top = score.topk(cfg.keep_per_point, dim=1).indices  # (P, keep)
        kept.append(torch.stack([cand[i, top[i]] for i in range(cfg.pic_nums)]).reshape(-1, d))
    return torch.cat(kept)


def test_outliers_equal_a_brute_force_reference():
    data = _clusters(c=3, n=60)
    cfg = KNNConfig(k=4, select=6, sigma=0.1, rounds=3, pic_nums=2, candidates=30, keep_per_point=3)
    out = sample_classes(data, cfg, seed=11)
    ref = torch.stack([_reference_class(data[c], cfg, 11, c) for c in range(3)])
    assert out.shape == ref.shape == (3, 3 * 2 * 3, 8)
    assert torch.allclose(out, ref, atol=1e-5)


def test_index_placement_follows_knn_use_gpu(monkeypatch):
    import oal.knn as K

    seen = []
    real = K._index
    monkeypatch.setattr(K, "_index", lambda x, use_gpu: seen.append(use_gpu) or real(x, use_gpu))
    data = _clusters(c=2, n=40)
    for flag in (True, False):
        sample_classes(data, KNNConfig(**{**vars(CFG), "use_gpu": flag}), seed=0)
    assert seen == [True, True, False, False]  # one index per class, placed as configured


def test_index_goes_to_gpu_0_only_with_faiss_gpu_support_and_a_gpu(monkeypatch):
    """The placement rule of `_index` with faiss's GPU calls stood in for (this machine may have faiss-cpu only)."""
    import faiss

    class Resources:
        pass

    calls = []

    def to_gpu(res, device, index):
        calls.append((type(res), device, type(index).__name__, index.d))
        return index  # the CPU index stands in for the GPU one

    monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    x = np.eye(3, dtype=np.float32)
    index = _index(x, use_gpu=True)
    assert calls == [(Resources, 0, "IndexFlatL2", 3)] and index.ntotal == 3  # GPU 0, then the points added
    assert kth_distance(index, x, 1).tolist() == [0.0, 0.0, 0.0]
    assert _index(x, use_gpu=False).ntotal == 3 and len(calls) == 1  # knn.use_gpu=false: the CPU
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert _index(x, use_gpu=True).ntotal == 3 and len(calls) == 1  # no GPU visible: the CPU
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    _index(x, use_gpu=True)
    assert calls[-1][1] == 0 and len(calls) == 2  # several GPUs: the first
    monkeypatch.delattr(faiss, "StandardGpuResources")
    assert _index(x, use_gpu=True).ntotal == 3 and len(calls) == 2  # faiss built without GPU support: the CPU
