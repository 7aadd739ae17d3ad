"""k-NN boundary sampling of outlier embeddings (NPOS-style), per class, on faiss.

For each class: find the `select` ID points whose K-th nearest neighbour is farthest (the class
boundary); then, for `rounds` rounds, perturb `pic_nums` random boundary points with `candidates`
Gaussian draws each (scale `sigma`), L2-normalise, and keep the `keep_per_point` candidates whose
K-th NN distance to the class's ID points is largest. Kept vectors are scaled by the class anchor's
norm so that they live at the scale of the text encoder's token embeddings.

Each class draws from its own generator, seeded by (seed, class), so that classes can be sampled apart (a Ray job
spreads them over workers) and give the same outliers as one process sampling them all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oal.config import KNNConfig


def _index(x: np.ndarray, use_gpu: bool) -> Any:
    import faiss

    index: Any = faiss.IndexFlatL2(x.shape[1])
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index


def kth_distance(index, queries: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance from each query to its k-th nearest point in `index`: (Q,)."""
    d, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)  # (Q, k), squared L2
    return np.sqrt(np.maximum(d[:, k - 1], 0.0))


def check_config(cfg: KNNConfig, n_per_class: int) -> None:
    if cfg.k >= n_per_class:
        raise ValueError(f"knn.k={cfg.k} must be smaller than the ID points per class ({n_per_class}); "
                         f"lower knn.k or raise embeddings.per_class_cap")
    if cfg.select > n_per_class:
        raise ValueError(f"knn.select={cfg.select} exceeds the ID points per class ({n_per_class})")
    if cfg.pic_nums > cfg.select:
        raise ValueError(f"knn.pic_nums={cfg.pic_nums} exceeds knn.select={cfg.select}")
    if cfg.keep_per_point > cfg.candidates:
        raise ValueError(f"knn.keep_per_point={cfg.keep_per_point} exceeds knn.candidates={cfg.candidates}")
    for key in ("k", "select", "rounds", "pic_nums", "candidates", "keep_per_point"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"knn.{key} must be >= 1")
    if cfg.sigma <= 0:
        raise ValueError(f"knn.sigma={cfg.sigma} must be > 0")


def sample_class(feats: torch.Tensor, cfg: KNNConfig, gen: torch.Generator) -> torch.Tensor:
    """Outliers for one class from its ID features (N, D): returns (rounds * pic_nums * keep, D), unit norm."""
    x = F.normalize(feats.float(), dim=-1).numpy()  # (N, D)
    index = _index(x, cfg.use_gpu)
    # k + 1 because each ID point finds itself first at distance 0.
    boundary = np.argsort(-kth_distance(index, x, cfg.k + 1))[: cfg.select]  # (select,)
    kept = []
    for _ in range(cfg.rounds):
        pick = boundary[torch.randperm(cfg.select, generator=gen)[: cfg.pic_nums].numpy()]  # (P,)
        noise = torch.randn(cfg.pic_nums, cfg.candidates, x.shape[1], generator=gen)  # (P, M, D)
        cand = F.normalize(torch.from_numpy(x[pick]).unsqueeze(1) + cfg.sigma * noise, dim=-1)  # (P, M, D)
        score = kth_distance(index, cand.reshape(-1, x.shape[1]).numpy(), cfg.k)  # (P*M,)
        top = torch.from_numpy(score).view(cfg.pic_nums, cfg.candidates).topk(cfg.keep_per_point, dim=1).indices
        kept.append(torch.gather(cand, 1, top.unsqueeze(-1).expand(-1, -1, x.shape[1])).reshape(-1, x.shape[1]))
    return torch.cat(kept)  # (rounds * P * keep, D)


def class_generator(seed: int, c: int) -> torch.Generator:
    """Class `c`'s own random stream: independent of the other classes' and of the order they are sampled in."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, c]).generate_state(1, np.uint64)[0]))


def sample_classes(embeddings: torch.Tensor, cfg: KNNConfig, seed: int, classes: range | None = None) -> torch.Tensor:
    """ID embeddings [C, N, D] -> unit-norm outlier embeddings [len(classes), M, D] of `classes` (default: all)."""
    if embeddings.dim() != 3:
        raise ValueError(f"ID embeddings must be [C, N, D]; got shape {tuple(embeddings.shape)}")
    check_config(cfg, embeddings.shape[1])
    classes = range(embeddings.shape[0]) if classes is None else classes
    if not classes:  # a block of no classes (more Ray workers than classes)
        return embeddings.new_zeros(0, cfg.rounds * cfg.pic_nums * cfg.keep_per_point, embeddings.shape[2])
    return torch.stack([sample_class(embeddings[c], cfg, class_generator(seed, c)) for c in classes])


def scale_to_anchors(outliers: torch.Tensor, anchor_norms: torch.Tensor | None) -> torch.Tensor:
    """Unit-norm outliers [C, M, D] scaled by each class anchor's norm [C] (unchanged when None)."""
    if anchor_norms is None:
        return outliers
    if anchor_norms.shape != (outliers.shape[0],):
        raise ValueError(f"anchor norms must be [C={outliers.shape[0]}]; got {tuple(anchor_norms.shape)}")
    return outliers * anchor_norms.view(-1, 1, 1).float()


def sample_outliers(embeddings: torch.Tensor, cfg: KNNConfig, seed: int,
                    anchor_norms: torch.Tensor | None = None) -> torch.Tensor:
    """ID embeddings [C, N, D] -> outlier embeddings [C, M, D], scaled by each class anchor's norm."""
    return scale_to_anchors(sample_classes(embeddings, cfg, seed), anchor_norms)
