"""Benchmarks: one registry, each entry building an ID train/val/test split and OOD sets."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

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
        def id_set(xy: tuple[np.ndarray, np.ndarray]) -> GreyImages:
            return GreyImages(xy[0], torch.as_tensor(xy[1], dtype=torch.long), size)

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


def _grey(x: np.ndarray, size: int) -> torch.Tensor:
    """(N, h, w) grey images, uint8 or float in [0, 1] -> (N, 1, size, size) normalised to mean 0.5 / std 0.5."""
    t = torch.as_tensor(x)
    t = (t.float() / 255.0 if t.dtype == torch.uint8 else t.float()).unsqueeze(1)  # (N, 1, h, w)
    if t.shape[-1] != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return (t - 0.5) / 0.5


def grey_images(x: np.ndarray, size: int) -> torch.Tensor:
    """(N, h, w) grey images, uint8 or float in [0, 1] -> (N, 3, size, size) normalised to mean 0.5 / std 0.5."""
    return _grey(x, size).expand(-1, 3, -1, -1).contiguous()


class GreyImages(Dataset):
    """A grey image set kept as it came, (N, h, w), and made into model input (what `grey_images` gives, image for
    image) one block of BLOCK images at a time, when an image of the block is first read; the block is kept, one
    channel of it (the three are the same). So a Ray shard task that reads half of the training set converts that
    half, and the splits a stage does not read cost nothing (the embeddings stage reads only the training set).
    `tensors` is the whole set converted, as a TensorDataset's."""

    BLOCK = 1024

    def __init__(self, x: np.ndarray, labels: torch.Tensor, size: int):
        if len(x) != len(labels):
            raise ValueError(f"{len(x)} grey images but {len(labels)} labels")
        self.x, self.labels, self.size = x, labels, size
        self._blocks: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.x)

    def _block(self, b: int) -> torch.Tensor:
        if b not in self._blocks:
            self._blocks[b] = _grey(self.x[b * self.BLOCK:(b + 1) * self.BLOCK], self.size)  # (n, 1, S, S)
        return self._blocks[b]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image {i} of a set of {n}")
        i %= n
        b, r = divmod(i, self.BLOCK)
        return self._block(b)[r].expand(3, -1, -1), self.labels[i]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = [self._block(b) for b in range(-(-len(self) // self.BLOCK))]
        if not blocks:
            return torch.zeros(0, 3, self.size, self.size), self.labels
        return torch.cat(blocks).expand(-1, 3, -1, -1).contiguous(), self.labels


def grey_ood_set(x: np.ndarray, size: int) -> GreyImages:
    """An OOD set of grey images, label -1."""
    return GreyImages(x, torch.full((len(x),), -1, dtype=torch.long), size)


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
