"""Fashion-MNIST (MIT licence, 70,000 grey 28x28 images, 10 classes): the embedded benchmark with room for
outliers to show what they do.

Split (class ids of the dataset):
  ID:               0 T-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat, 6 shirt (clothing)
  validation OOD:   8 bag (tuning only: Ray Tune's metric, model selection; never a test set)
  near-OOD test:    5 sandal, 7 sneaker, 9 ankle boot (footwear: same sensor, same framing, unseen classes)
  far-OOD test:     scikit-learn's handwritten digits (upsampled from 8x8), grey patches of scikit-learn's two
                    sample photographs, uniform noise
Why this split: probes with a 3-layer CNN (1,000 images per class, 5 epochs; issue 12) gave CE + EBO only
53.2 near-OOD AUROC and 54.5 on noise here, and outlier exposure with real bag images 91.6 near-OOD: the
widest gap between a plain classifier and one trained with good outliers among the splits probed, so a
method that makes good outliers has room to show it. Bag is also the one class left to validate on.

Sizes: `data.train_per_class` training images per ID class (default 1,000 of 6,000, for 2-core epochs;
drawn with `data.split_seed`), 200 more per class for ID validation, the official test set (1,000 per class)
for ID test and near-OOD; 1,000 bag images for validation OOD, and another 1,000 set aside (`real_outliers`)
for an outlier-exposure upper bound (not used yet).

Files: the four gzipped (or plain) idx files, found in `data.root` when it is given (flat, or torchvision's
`FashionMNIST/raw/`; only there), else in Debian's `dataset-fashion-mnist` location, else in the cache that
`python -m oal.data fashion` fills without root (`apt-get download` + `dpkg-deb -x`). Nothing is
downloaded while a pipeline runs.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oal.config import DataConfig
from oal.data import Arrays, photo_patches, register_arrays

log = logging.getLogger("oal.data")
NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
ID_CLASSES = (0, 1, 2, 3, 4, 6)
VAL_OOD_CLASSES = (8,)
NEAR_CLASSES = (5, 7, 9)


@dataclass(frozen=True)
class Split:
    """Which Fashion-MNIST classes are ID, validation OOD and near-OOD test (the far sets are the same for all)."""

    id_classes: tuple[int, ...]
    val_ood: tuple[int, ...]
    near: tuple[int, ...]
    near_name: str
    val_name: str


# The registered splits, each a benchmark name. The probe that compared them (`python -m bench.split_probe`; the CE
# base stage under its validation-chosen score, near-OOD AUROC on the test set) and the rule that picked
# `fashion_tops`: docs/benchmarks.md, "A near-OOD split with room".
SPLITS = {
    "fashion": Split(ID_CLASSES, VAL_OOD_CLASSES, NEAR_CLASSES, "footwear", "bag"),
}
PROBED = {  # candidates measured by the probe, registered too so that it can build them
    "fashion_tops": Split((0, 1, 3, 5, 7, 9), (8,), (2, 4, 6), "tops", "bag"),
    "fashion_shirt": Split((0, 1, 2, 3, 4, 5, 7, 9), (8,), (6,), "shirt", "bag"),
    "fashion_garments": Split((0, 1, 5, 7, 8, 9), (3,), (2, 4, 6), "garments", "dress"),
    "fashion_upper": Split((1, 2, 3, 5, 7, 9), (8,), (0, 4, 6), "upper", "bag"),
}
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
VAL_PER_CLASS = 200
OOD_VAL_IMAGES = 1000


def cache_dir() -> Path:
    """Where `fetch` unpacks the Debian package: $OAL_DATA_DIR, else ~/.cache/oal."""
    return Path(os.environ.get("OAL_DATA_DIR") or Path.home() / ".cache" / "oal") / "fashion-mnist"


def _has_files(d: Path) -> bool:
    return all((d / f"{n}.gz").is_file() or (d / n).is_file() for n in FILES.values())


def find_dir(root: str | None) -> Path:
    """The first folder holding all four idx files: data.root (flat or FashionMNIST/raw) when given (only there:
    a given folder is never silently replaced by another copy), else Debian's, then the cache."""
    if root is not None:
        tried = [Path(root), Path(root) / "FashionMNIST" / "raw", Path(root) / "raw"]
    else:
        tried = [DEBIAN_DIR, cache_dir() / DEBIAN_DIR.relative_to("/")]
    for d in tried:
        if _has_files(d):
            return d
    fix = ("give the folder that holds them as data.root, or leave data.root unset to use Debian's or the cache "
           "(`python -m oal.data fashion` fills it)" if root is not None else
           f"run `python -m oal.data fashion` (fetches Debian's {DEBIAN_PACKAGE} package without root into "
           f"{cache_dir()}), or give data.root")
    raise FileNotFoundError("Fashion-MNIST idx files (" + ", ".join(f"{n}[.gz]" for n in FILES.values())
                            + ") not found in " + ", ".join(str(d) for d in tried) + "; " + fix)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (gzipped or not) of unsigned bytes with `ndim` dimensions; one clear error if it is not."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"idx file '{path}' cannot be read ({type(e).__name__}: {e}); expected a gzipped idx file "
                         f"of Fashion-MNIST: fetch it again") from None
    magic = 0x800 + ndim  # 0x08: unsigned byte, then the number of dimensions
    if len(raw) < 4 + 4 * ndim or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"idx file '{path}' does not start with the idx header of an unsigned-byte array of "
                         f"{ndim} dimension(s) (magic {magic:#010x}): not an idx file, or the wrong one")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = memoryview(raw)[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise ValueError(f"idx file '{path}' is truncated or padded: its header promises {dims} = "
                         f"{int(np.prod(dims))} bytes of data, the file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_split(d: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of split train | test."""
    def file(key: str) -> Path:
        p = d / f"{FILES[key]}.gz"
        return p if p.is_file() else d / FILES[key]

    x = read_idx(file(f"{split}_images"), 3)
    y = read_idx(file(f"{split}_labels"), 1)
    if len(x) != len(y):
        raise ValueError(f"Fashion-MNIST {split} split in '{d}': {len(x)} images but {len(y)} labels")
    if y.max() >= len(NAMES):
        raise ValueError(f"Fashion-MNIST {split} labels in '{d}' go up to {y.max()}; expected 0-9")
    return x, y.astype(np.int64)


def fetch(dest: Path | None = None) -> Path:
    """Unpack Debian's dataset-fashion-mnist into `dest` (default: the cache) without root; returns the idx folder."""
    dest = dest or cache_dir()
    target = dest / DEBIAN_DIR.relative_to("/")
    if _has_files(target):
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("fetching Fashion-MNIST needs apt-get and dpkg-deb (Debian/Ubuntu); elsewhere put the "
                           "four idx files in a folder and give it as data.root")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        staging = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
        found = staging / DEBIAN_DIR.relative_to("/")
        if not _has_files(found):
            raise RuntimeError(f"{deb.name} holds no Fashion-MNIST idx files under {DEBIAN_DIR}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(found, partial)
        partial.rename(target)  # whole or not at all
    return target


def _take(y: np.ndarray, classes: tuple[int, ...], n: int | None, rng: np.random.Generator,
          exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of up to n images of each class (all when n is None), drawn at random, none in `exclude`."""
    out = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        if exclude is not None:
            idx = np.setdiff1d(idx, exclude)
        idx = rng.permutation(idx)
        out.append(idx if n is None else idx[:n])
    return np.sort(np.concatenate(out))


def split_indices(y_train: np.ndarray, train_per_class: int | None, seed: int,
                  split: Split = SPLITS["fashion"]) -> dict[str, np.ndarray]:
    """Disjoint index sets into the training split: ID train, ID val, validation OOD, real outliers (OE)."""
    rng = np.random.default_rng(seed)
    val = _take(y_train, split.id_classes, VAL_PER_CLASS, rng)
    train = _take(y_train, split.id_classes, train_per_class, rng, exclude=val)
    ood_val = _take(y_train, split.val_ood, OOD_VAL_IMAGES, rng)
    real = _take(y_train, split.val_ood, OOD_VAL_IMAGES, rng, exclude=ood_val)
    return {"train": train, "val": val, "ood_val": ood_val, "real_outliers": real}


def arrays(cfg: DataConfig, name: str = "fashion") -> Arrays:
    split = {**SPLITS, **PROBED}[name]
    d = find_dir(cfg.root)
    x_tr, y_tr = load_split(d, "train")
    x_te, y_te = load_split(d, "test")
    idx = split_indices(y_tr, cfg.train_per_class, cfg.split_seed, split)
    remap = np.full(len(NAMES), -1)
    remap[list(split.id_classes)] = np.arange(len(split.id_classes))  # dataset label -> ID class index

    from sklearn.datasets import load_digits

    test_id = np.isin(y_te, split.id_classes)
    rng = np.random.default_rng(cfg.split_seed + 1)
    return Arrays(
        name=name,
        class_names=[NAMES[c] for c in split.id_classes],
        train=(x_tr[idx["train"]], remap[y_tr[idx["train"]]]),
        val=(x_tr[idx["val"]], remap[y_tr[idx["val"]]]),
        test=(x_te[test_id], remap[y_te[test_id]]),
        ood_val={split.val_name: x_tr[idx["ood_val"]]},
        near={split.near_name: x_te[np.isin(y_te, split.near)]},
        far={
            "digits": (load_digits().images / 16.0).astype(np.float32),
            "photo_patches": photo_patches(1000, 28, cfg.split_seed + 2),
            "noise": rng.random((1000, 28, 28), dtype=np.float32),
        },
    )


for _name in (*SPLITS, *PROBED):
    register_arrays(_name)(lambda cfg, _n=_name: arrays(cfg, _n))
