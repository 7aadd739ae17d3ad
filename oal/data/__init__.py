"""Benchmarks: one registry, each entry building an ID train/val/test split and OOD sets."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from oal.config import DataConfig


class DataError(ValueError):
    """A data file that cannot be used, named in a one-line message.

    Raised inside a DataLoader worker, torch re-raises it in the main process as the same type built from its own
    text ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); this class keeps only the
    original one-line message from that text, so what reaches the user is still one line naming the file."""

    def __init__(self, message: str):
        if "Original Traceback" in message:
            for line in reversed(message.rstrip().splitlines()):
                m = re.match(r"[\w.]*DataError: (.*)$", line)
                if m:
                    message = m.group(1)
                    break
        super().__init__(message)


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
    # Per-channel mean and std that normalise the model's input (images in [0, 1]); decoded outliers use them too
    norm: tuple[tuple[float, ...], tuple[float, ...]] = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    info: dict = field(default_factory=dict)  # what a folder or imglist dataset measured or drew (for manifests)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Arrays:
    """A grey benchmark's images before they become tensors, each (N, h, w) uint8 or float in [0, 1] at the size
    they come in; labels are ID class indices. What `python -m oal.data export` writes as files."""

    name: str
    class_names: list[str]
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    ood_val: dict[str, np.ndarray]
    near: dict[str, np.ndarray]
    far: dict[str, np.ndarray]

    def benchmark(self, size: int) -> Benchmark:
        """The images upsampled to `size`, replicated to 3 channels and normalised to mean 0.5 / std 0.5."""
        def id_set(xy: tuple[np.ndarray, np.ndarray]) -> TensorDataset:
            return TensorDataset(grey_images(xy[0], size), torch.as_tensor(xy[1], dtype=torch.long))

        train = id_set(self.train)
        return Benchmark(name=self.name, class_names=list(self.class_names), train=train, train_plain=train,
                         val=id_set(self.val), test=id_set(self.test),
                         ood_val={k: grey_ood_set(x, size) for k, x in self.ood_val.items()},
                         near={k: grey_ood_set(x, size) for k, x in self.near.items()},
                         far={k: grey_ood_set(x, size) for k, x in self.far.items()})


BENCHMARKS: dict[str, Callable[[DataConfig], Benchmark]] = {}
ARRAYS: dict[str, Callable[[DataConfig], Arrays]] = {}  # the embedded benchmarks, as arrays (for export)


def register(name: str) -> Callable:
    def deco(fn: Callable[[DataConfig], Benchmark]) -> Callable[[DataConfig], Benchmark]:
        BENCHMARKS[name] = fn
        return fn
    return deco


def register_arrays(name: str) -> Callable:
    """Register an embedded grey benchmark by the function that makes its arrays (built at `data.image_size`)."""
    def deco(fn: Callable[[DataConfig], Arrays]) -> Callable[[DataConfig], Arrays]:
        ARRAYS[name] = fn
        BENCHMARKS[name] = lambda cfg: fn(cfg).benchmark(cfg.image_size)
        return fn
    return deco


def grey_images(x: np.ndarray, size: int) -> torch.Tensor:
    """(N, h, w) grey images, uint8 or float in [0, 1] -> (N, 3, size, size) normalised to mean 0.5 / std 0.5."""
    t = torch.as_tensor(x)
    t = (t.float() / 255.0 if t.dtype == torch.uint8 else t.float()).unsqueeze(1)  # (N, 1, h, w)
    if t.shape[-1] != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return ((t - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)


def grey_ood_set(x: np.ndarray, size: int) -> TensorDataset:
    """An OOD set of grey images, label -1."""
    return TensorDataset(grey_images(x, size), torch.full((len(x),), -1, dtype=torch.long))


def photo_patches(n: int, side: int, seed: int) -> np.ndarray:
    """n grey side x side patches in [0, 1]: area-downsampled (4x) crops of scikit-learn's two sample photographs."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [img.mean(axis=2) / 255.0 for img in load_sample_images().images]  # (H, W) each
    out = np.empty((n, side, side), dtype=np.float32)
    crop = 4 * side
    for i in range(n):
        p = photos[i % len(photos)]
        r, c = rng.integers(0, p.shape[0] - crop), rng.integers(0, p.shape[1] - crop)
        out[i] = p[r:r + crop, c:c + crop].reshape(side, 4, side, 4).mean(axis=(1, 3))
    return out


def build_benchmark(cfg: DataConfig) -> Benchmark:
    if cfg.benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark '{cfg.benchmark}' (data.benchmark); registered: "
                         f"{', '.join(sorted(BENCHMARKS))}")
    for key in ("root", "openood_root", "imglist"):  # a folder given is used or is an error, never another copy
        given = getattr(cfg, key)
        if given is not None and "://" not in given and not Path(given).expanduser().is_dir():
            raise FileNotFoundError(f"data.{key} is '{given}', which is not an existing folder")
    return BENCHMARKS[cfg.benchmark](cfg)


from oal.data import cifar, digits, fashion, folder  # noqa: E402,F401  (registration side effects)
