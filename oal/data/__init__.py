"""Benchmarks: one registry, each entry building an ID train/val/test split and OOD sets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from oal.config import DataConfig


@dataclass
class Benchmark:
    name: str
    class_names: list[str]
    train: Dataset  # ID training images, with training augmentation
    train_plain: Dataset  # the same images without augmentation (for features)
    val: Dataset  # ID validation images (model selection, never test)
    test: Dataset  # ID test images
    ood_val: dict[str, Dataset] = field(default_factory=dict)  # validation OOD, disjoint from the test OOD sets
    near: dict[str, Dataset] = field(default_factory=dict)  # near-OOD test sets
    far: dict[str, Dataset] = field(default_factory=dict)  # far-OOD test sets

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


BENCHMARKS: dict[str, Callable[[DataConfig], Benchmark]] = {}


def register(name: str) -> Callable:
    def deco(fn: Callable[[DataConfig], Benchmark]) -> Callable[[DataConfig], Benchmark]:
        BENCHMARKS[name] = fn
        return fn
    return deco


def build_benchmark(cfg: DataConfig) -> Benchmark:
    if cfg.benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark '{cfg.benchmark}' (data.benchmark); registered: "
                         f"{', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[cfg.benchmark](cfg)


from oal.data import cifar, digits, fashion  # noqa: E402,F401  (registration side effects)
