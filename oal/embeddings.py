"""ID embeddings: a network's penultimate features on the ID training set, grouped by class."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from oal.evaluate import Outputs, collect


def class_embeddings(net: nn.Module, dataset: Dataset, num_classes: int, cap: int, device: str | torch.device,
                     batch_size: int = 256, seed: int = 0) -> torch.Tensor:
    """Features of up to `cap` images per class (a seeded random choice): [C, N, D] with
    N = min(cap, smallest class count), so that every class contributes equally."""
    return per_class_sample(collect(net, dataset, batch_size, device), num_classes, cap, seed)


def per_class_sample(out: Outputs, num_classes: int, cap: int, seed: int = 0) -> torch.Tensor:
    """`class_embeddings` from the network's outputs on the whole ID training set, in dataset order."""
    counts = torch.bincount(out.labels, minlength=num_classes)  # (C,)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no training images; the class list does not match the data")
    n = int(min(cap, counts.min().item()))
    gen = torch.Generator().manual_seed(seed)
    per_class = []
    for c in range(num_classes):
        idx = torch.nonzero(out.labels == c).flatten()
        per_class.append(out.features[idx[torch.randperm(len(idx), generator=gen)[:n]]])  # (N, D)
    return torch.stack(per_class)  # (C, N, D)
