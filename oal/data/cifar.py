"""CIFAR-10/100 from a local torchvision folder, and OpenOOD v1.5 image lists for the OOD sets.

Nothing is downloaded. `data.root` holds `cifar-10-batches-py/` or `cifar-100-python/` (torchvision's
on-disk format). `data.openood_root` holds OpenOOD v1.5's `benchmark_imglist/<id>/*.txt` and
`images_classic/` (CIFAR) or `images_largescale/` (ImageNet-200); each list line is
`<path relative to the images folder> <label>`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from oal.config import DataConfig
from oal.data import Benchmark, register

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet200": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# OpenOOD v1.5 splits: (validation OOD, near-OOD test, far-OOD test) list-file stems per ID set.
OPENOOD_SPLITS = {
    "cifar10": ({"tin": "val_tin"}, {"cifar100": "test_cifar100", "tin": "test_tin"},
                {"mnist": "test_mnist", "svhn": "test_svhn", "texture": "test_texture",
                 "places365": "test_places365"}),
    "cifar100": ({"tin": "val_tin"}, {"cifar10": "test_cifar10", "tin": "test_tin"},
                 {"mnist": "test_mnist", "svhn": "test_svhn", "texture": "test_texture",
                  "places365": "test_places365"}),
    "imagenet200": ({"openimage_o": "val_openimage_o"}, {"ssb_hard": "test_ssb_hard", "ninco": "test_ninco"},
                    {"inaturalist": "test_inaturalist", "textures": "test_textures",
                     "openimage_o": "test_openimage_o"}),
}


class ImageList(Dataset):
    """An OpenOOD image list: one `relative/path label` per line, images read with PIL."""

    def __init__(self, list_file: Path, images_dir: Path, transform: Callable, ood: bool):
        if not list_file.is_file():
            raise FileNotFoundError(f"OpenOOD image list '{list_file}' does not exist (data.openood_root)")
        self.items = []
        for n, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(" ", 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{list_file}:{n}: expected '<path> <label>', got {line!r}")
            self.items.append((images_dir / parts[0], -1 if ood else int(parts[1])))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def _transforms(name: str, size: int) -> tuple[Callable, Callable]:
    mean, std = MEAN_STD[name]
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if size == 32:
        train = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *norm])
    else:
        train = transforms.Compose([transforms.Resize(size), transforms.RandomCrop(size, padding=size // 8),
                                    transforms.RandomHorizontalFlip(), *norm])
    test = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), *norm])
    return train, test


def openood_sets(name: str, root: str | None, transform: Callable) -> tuple[dict, dict, dict]:
    if root is None:
        return {}, {}, {}
    base = Path(root)
    images = base / ("images_largescale" if name == "imagenet200" else "images_classic")
    lists = base / "benchmark_imglist" / name
    return tuple(  # type: ignore[return-value]
        {k: ImageList(lists / f"{stem}.txt", images, transform, ood=True) for k, stem in split.items()}
        for split in OPENOOD_SPLITS[name]
    )


def _cifar(name: str, cfg: DataConfig) -> Benchmark:
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if cfg.root is None or not (Path(cfg.root) / folder).is_dir():
        raise FileNotFoundError(f"{name}: expected torchvision's folder '{Path(cfg.root or '<data.root>') / folder}'"
                                f" (set data.root; nothing is downloaded)")
    train_tf, test_tf = _transforms(name, cfg.image_size)
    train = cls(cfg.root, train=True, transform=train_tf, download=False)
    plain = cls(cfg.root, train=True, transform=test_tf, download=False)
    test = cls(cfg.root, train=False, transform=test_tf, download=False)
    # ID validation: a fixed 1,000-image slice of the test split's complement is not available in
    # torchvision's format, so validation uses every 10th test image and test keeps the rest.
    idx = torch.arange(len(test))
    val = torch.utils.data.Subset(test, idx[idx % 10 == 0].tolist())
    test_rest = torch.utils.data.Subset(test, idx[idx % 10 != 0].tolist())
    ood_val, near, far = openood_sets(name, cfg.openood_root, test_tf)
    return Benchmark(name=name, class_names=list(train.classes), train=train, train_plain=plain, val=val,
                     test=test_rest, ood_val=ood_val, near=near, far=far)


@register("cifar10")
def build_cifar10(cfg: DataConfig) -> Benchmark:
    return _cifar("cifar10", cfg)


@register("cifar100")
def build_cifar100(cfg: DataConfig) -> Benchmark:
    return _cifar("cifar100", cfg)


@register("imagenet200")
def build_imagenet200(cfg: DataConfig) -> Benchmark:
    """ImageNet-200 entirely from OpenOOD v1.5 lists (train/val/test_imagenet200.txt)."""
    if cfg.openood_root is None:
        raise FileNotFoundError("imagenet200 needs data.openood_root (OpenOOD v1.5 benchmark_imglist/ + "
                                "images_largescale/)")
    train_tf, test_tf = _transforms("imagenet200", cfg.image_size)
    base = Path(cfg.openood_root)
    lists, images = base / "benchmark_imglist" / "imagenet200", base / "images_largescale"

    def ds(stem: str, tf: Callable) -> ImageList:
        return ImageList(lists / f"{stem}.txt", images, tf, ood=False)

    train = ds("train_imagenet200", train_tf)
    labels = sorted({label for _, label in train.items})
    ood_val, near, far = openood_sets("imagenet200", cfg.openood_root, test_tf)
    return Benchmark(name="imagenet200", class_names=[f"class {i}" for i in labels], train=train,
                     train_plain=ds("train_imagenet200", test_tf), val=ds("val_imagenet200", test_tf),
                     test=ds("test_imagenet200", test_tf), ood_val=ood_val, near=near, far=far)
