"""CIFAR-10/100 and ImageNet-200 from OpenOOD v1.5's image lists, or CIFAR from a local torchvision folder.

Nothing is downloaded. `data.openood_root` holds OpenOOD v1.5's `benchmark_imglist/<id>/*.txt` and
`images_classic/` (CIFAR) or `images_largescale/` (ImageNet-200); each list line is
`<path relative to the images folder> <label>`. With it, the ID train/val/test split is OpenOOD's own
(`train_<id>.txt`, `val_<id>.txt`, `test_<id>.txt`: for CIFAR 1,000 validation and 9,000 test images
taken from the test split), the one the leaderboard's numbers are measured on, and the OOD sets come
from the same tree. Without it, CIFAR comes from `data.root` in torchvision's on-disk format
(`cifar-10-batches-py/` or `cifar-100-python/`), with every 10th test image as validation: not the
leaderboard's split, and no OOD sets.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision import datasets, transforms

from oal.config import DataConfig
from oal.data import Benchmark, DataError, register
from oal.data.files import ImageFiles, list_lines, reason
from oal.data.names import CIFAR10_NAMES, CIFAR100_NAMES, imagenet_class_names

log = logging.getLogger(__name__)

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),  # OpenOOD's values
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


class ImageList(ImageFiles):
    """An OpenOOD image list: one `relative/path label` per line, images read with PIL.

    An image that cannot be read (missing, not an image, truncated) is, with `on_bad_image="error"`, a DataError
    naming the file and the list line it came from, raised when it is read. With "skip", every listed file's
    header is read once here (one open per file: seconds per 100,000 local files) and the unreadable ones are left
    out, their count logged; a file whose header reads but whose pixels do not is replaced by the next readable
    one of the list when it is read (logged)."""

    def __init__(self, list_file: Path, images_dir: Path, transform: Callable, ood: bool, on_bad_image: str = "error"):
        if not list_file.is_file():
            raise FileNotFoundError(f"OpenOOD image list '{list_file}' does not exist (data.openood_root)")
        self.list_file = list_file
        items, where = [], []
        for n, path, label in list_lines(list_file.read_text(), str(list_file)):
            items.append((images_dir / path, -1 if ood else label))
            where.append(f"line {n} of {list_file}")
        super().__init__(items, where, transform, on_bad_image, source=str(list_file))


def _transforms(name: str, size: int) -> tuple[Callable, Callable]:
    """OpenOOD v1.5's preprocessors: CIFAR resized to `size` (bilinear), then a 4-pixel-padded random crop and
    a flip (at 224 too, as the reference trains); ImageNet-200 a random resized crop and a flip."""
    mean, std = MEAN_STD[name]
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if name == "imagenet200":
        train = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *norm])
    elif size == 32:
        train = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *norm])
    else:
        train = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                    transforms.RandomHorizontalFlip(), transforms.RandomCrop(size, padding=4), *norm])
    pre = size * 256 // 224 if name == "imagenet200" else size  # OpenOOD: ImageNet resized to 256, cropped to 224
    test = transforms.Compose([transforms.Resize(pre), transforms.CenterCrop(size), *norm])
    return train, test


def openood_sets(name: str, root: str | None, transform: Callable,
                 on_bad_image: str = "error") -> tuple[dict, dict, dict]:
    if root is None:
        return {}, {}, {}
    base = Path(root)
    images = base / ("images_largescale" if name == "imagenet200" else "images_classic")
    lists = base / "benchmark_imglist" / name
    return tuple(  # type: ignore[return-value]
        {k: ImageList(lists / f"{stem}.txt", images, transform, ood=True, on_bad_image=on_bad_image)
         for k, stem in split.items()}
        for split in OPENOOD_SPLITS[name]
    )


def _from_lists(name: str, cfg: DataConfig, class_names: Callable[[ImageList], list[str]]) -> Benchmark:
    """ID train/val/test and the OOD sets, all from OpenOOD v1.5 lists under `data.openood_root`."""
    assert cfg.openood_root is not None
    train_tf, test_tf = _transforms(name, cfg.image_size)
    base = Path(cfg.openood_root)
    lists = base / "benchmark_imglist" / name
    images = base / ("images_largescale" if name == "imagenet200" else "images_classic")

    def ds(stem: str, tf: Callable) -> ImageList:
        return ImageList(lists / f"{stem}.txt", images, tf, ood=False, on_bad_image=cfg.on_bad_image)

    train = ds(f"train_{name}", train_tf)
    plain = copy.copy(train)  # the same list, read once (with data.on_bad_image=skip every header is opened)
    plain.transform = test_tf
    names = class_names(train)
    labels = sorted({label for _, label in train.items})
    if labels != list(range(len(names))):
        raise ValueError(f"{lists / f'train_{name}.txt'}: labels must be 0..{len(names) - 1} for {name}'s "
                         f"{len(names)} classes; found {len(labels)} distinct labels from {labels[0]} to {labels[-1]}")
    ood_val, near, far = openood_sets(name, cfg.openood_root, test_tf, cfg.on_bad_image)
    return Benchmark(name=name, class_names=names, train=train, train_plain=plain,
                     val=ds(f"val_{name}", test_tf), test=ds(f"test_{name}", test_tf), ood_val=ood_val, near=near,
                     far=far, norm=MEAN_STD[name])


def _cifar(name: str, cfg: DataConfig) -> Benchmark:
    names = CIFAR10_NAMES if name == "cifar10" else CIFAR100_NAMES
    if cfg.openood_root is not None:
        return _from_lists(name, cfg, lambda _: list(names))
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if cfg.root is None or not (Path(cfg.root) / folder).is_dir():
        raise FileNotFoundError(f"{name}: expected torchvision's folder '{Path(cfg.root or '<data.root>') / folder}'"
                                f" (set data.root; nothing is downloaded)")
    train_tf, test_tf = _transforms(name, cfg.image_size)
    try:
        train = cls(cfg.root, train=True, transform=train_tf, download=False)
        plain = cls(cfg.root, train=True, transform=test_tf, download=False)
        test = cls(cfg.root, train=False, transform=test_tf, download=False)
    except Exception as e:  # torchvision's checksum check, a truncated or foreign pickle: one message
        raise DataError(f"{name}: torchvision's folder '{Path(cfg.root) / folder}' cannot be read ({reason(e)}); "
                        f"expected the unmodified {folder} files (their checksums are checked)") from None
    # ID validation: a fixed 1,000-image slice of the test split's complement is not available in
    # torchvision's format, so validation uses every 10th test image and test keeps the rest.
    idx = torch.arange(len(test))
    val = torch.utils.data.Subset(test, idx[idx % 10 == 0].tolist())
    test_rest = torch.utils.data.Subset(test, idx[idx % 10 != 0].tolist())
    if len(train.classes) != len(names):
        raise ValueError(f"{name}: torchvision's folder has {len(train.classes)} classes, expected {len(names)}")
    return Benchmark(name=name, class_names=list(names), train=train, train_plain=plain, val=val,
                     test=test_rest, norm=MEAN_STD[name])


@register("cifar10")
def build_cifar10(cfg: DataConfig) -> Benchmark:
    return _cifar("cifar10", cfg)


@register("cifar100")
def build_cifar100(cfg: DataConfig) -> Benchmark:
    return _cifar("cifar100", cfg)


@register("imagenet200")
def build_imagenet200(cfg: DataConfig) -> Benchmark:
    """ImageNet-200 entirely from OpenOOD v1.5 lists (train/val/test_imagenet200.txt); class names are the
    WordNet lemmas of the synset folders the training list names."""
    if cfg.openood_root is None:
        raise FileNotFoundError("imagenet200 needs data.openood_root (OpenOOD v1.5 benchmark_imglist/ + "
                                "images_largescale/)")
    return _from_lists("imagenet200", cfg, imagenet_class_names)
