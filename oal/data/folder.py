"""Your own data: an image folder (`data.benchmark=folder`) or image lists (`data.benchmark=imglist`), on local disk
or under an s3:// prefix (fetched by the processes that read it into this node's object cache, once per version).

folder, under data.root:
    classes.txt           optional: one line per class, `<folder> [display name]`; its order is the label order
                          (default: the class folders by name; display name = folder name with '_' as ' ')
    train/<class>/<image> ID training images (png, jpg, jpeg, bmp, gif, webp, tif, tiff; grey or colour)
    val/<class>/...       optional ID validation images; without it, data.val_fraction of each class's training
                          images, drawn with data.split_seed
    test/<class>/...      ID test images
    ood/val/<set>/...     validation OOD (chooses the score, KNN's K, the detector's threshold; never a test set)
    ood/near/<set>/...    near-OOD test sets
    ood/far/<set>/...     far-OOD test sets
Within a split, images are taken in the order of their file names, then of their class folders.

imglist, OpenOOD v1.5's list format, under data.imglist (each line `<path under data.root> <label>`):
    train.txt, test.txt, optional val.txt (labels 0..C-1), optional classes.txt (line i: label i's display name),
    ood/val/<set>.txt, ood/near/<set>.txt, ood/far/<set>.txt (labels ignored; a bare path is fine)

Every image is converted to RGB (grey replicated), its shorter side resized to data.image_size (bilinear) and the
longer centre-cropped, then normalised by data.mean / data.std (measured on the training images when null).
What is wrong with the layout is one DataError naming the class, set, list line or file, before any image is used.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from oal import storage
from oal.config import DataConfig, KNNConfig
from oal.data import ARRAYS, Benchmark, DataError, register
from oal.data.files import ImageFiles, Pixels, list_lines, pixels
from oal.images import square

log = logging.getLogger("oal.data")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
OOD_ROLES = ("val", "near", "far")
MEASURE_IMAGES = 1000  # training images that measure the mean and std when data.mean / data.std are null


@dataclass
class Layout:
    """What a folder or a set of lists holds, from a listing (no image opened): paths are relative to `root`."""

    root: str
    folders: list[str]  # class folder names (folder layout) or label strings, in label order
    names: list[str]  # display names (prompts, reports)
    splits: dict[str, list[tuple[str, int, str]]]  # train / val / test: (path, label, where it was named)
    ood: dict[str, dict[str, list[tuple[str, str]]]] = field(default_factory=dict)  # role -> set -> (path, where)
    val_note: str = "given"

    def counts(self, split: str = "train") -> list[int]:
        n = [0] * len(self.folders)
        for _, label, _ in self.splits[split]:
            n[label] += 1
        return n


def _is_image(rel: str) -> bool:
    return Path(rel).suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in rel.split("/"))


def _class_list(text: str | None, found: list[str], where: str) -> tuple[list[str], list[str]]:
    """(folders, display names) from classes.txt's text (None: the folders found, by name)."""
    if text is None:
        return found, [f.replace("_", " ") for f in found]
    folders, names = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        folder, _, name = line.strip().partition(" ")
        if folder in folders:
            raise DataError(f"{where}:{n}: class folder '{folder}' is listed twice")
        folders.append(folder)
        names.append(name.strip() or folder.replace("_", " "))
    if not folders:
        raise DataError(f"{where} lists no class; expected one line per class, `<folder> [display name]`")
    return folders, names


def _draw_val(lay: Layout, fraction: float, seed: int) -> None:
    """Move `fraction` of each class's training images (at least one, and never the last) to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(len(lay.folders)):
        items = [it for it in lay.splits["train"] if it[1] == c]
        k = min(max(1, math.ceil(fraction * len(items))), len(items) - 1)
        chosen = set(rng.permutation(len(items))[:k].tolist())
        val += [it for j, it in enumerate(items) if j in chosen]
        train += [it for j, it in enumerate(items) if j not in chosen]
    order = {it[0]: j for j, it in enumerate(lay.splits["train"])}
    lay.splits["train"] = sorted(train, key=lambda it: order[it[0]])
    lay.splits["val"] = sorted(val, key=lambda it: order[it[0]])
    lay.val_note = f"drawn: {len(val)} of the training images (data.val_fraction={fraction}, data.split_seed={seed})"


def _cap(lay: Layout, per_class: int | None, seed: int) -> None:
    """Keep at most `per_class` training images of each class (data.train_per_class), drawn with the split seed."""
    if per_class is None:
        return
    rng = np.random.default_rng(seed + 1)
    keep = set()
    for c in range(len(lay.folders)):
        idx = [j for j, it in enumerate(lay.splits["train"]) if it[1] == c]
        keep |= {idx[j] for j in rng.permutation(len(idx))[:per_class].tolist()}
    lay.splits["train"] = [it for j, it in enumerate(lay.splits["train"]) if j in keep]


def _check(lay: Layout, has_val: bool, described: Callable[[str, int], str]) -> None:
    """A class with no image in a split, and OOD roles with no set, each named."""
    for split in ("train", "val", "test") if has_val else ("train", "test"):
        for c, n in enumerate(lay.counts(split)):
            if n == 0:
                raise DataError(f"class '{lay.folders[c]}' has no image in {split} ({described(split, c)}); every "
                                f"class needs training and test images (and validation ones when validation is given)")
    for c, n in enumerate(lay.counts("train")):
        if n < 2 and not has_val:
            raise DataError(f"class '{lay.folders[c]}' has {n} training image; with no validation split given, "
                            f"at least 2 are needed (one is drawn for validation)")
    if not lay.ood.get("val"):
        raise DataError(f"no validation OOD set in {lay.root}: expected ood/val/<set>/ images (folder) or "
                        f"ood/val/<set>.txt (imglist); it chooses the score and the detector's threshold")
    if not lay.ood.get("near") and not lay.ood.get("far"):
        raise DataError(f"no OOD test set in {lay.root}: expected ood/near/<set>/ or ood/far/<set>/ images (folder), "
                        f"or ood/near/<set>.txt or ood/far/<set>.txt (imglist)")


def scan_folder(cfg: DataConfig) -> Layout:
    """The folder layout under data.root, from one listing."""
    root = str(cfg.root)
    files = sorted(storage.inventory(root))
    if storage.remote(storage.local(root)) is None and not Path(root).is_dir():
        raise DataError(f"data.root '{root}' is not a folder; expected train/<class>/, test/<class>/, ood/val/<set>/")
    folders_seen: dict[str, set[str]] = {s: set() for s in ("train", "val", "test")}
    images: dict[str, list[tuple[str, str]]] = {s: [] for s in ("train", "val", "test")}  # (path, class folder)
    ood: dict[str, dict[str, list[tuple[str, str]]]] = {r: {} for r in OOD_ROLES}
    empty_sets: list[str] = []
    for rel in files:
        parts = rel.split("/")
        if parts[0] in images and len(parts) >= 2:
            if len(parts) == 2:
                if _is_image(rel):
                    raise DataError(f"image '{rel}' under {root} is not in a class folder; expected "
                                    f"{parts[0]}/<class>/<image>")
                continue
            folders_seen[parts[0]].add(parts[1])
            if _is_image(rel):
                images[parts[0]].append((rel, parts[1]))
        elif parts[0] == "ood" and len(parts) >= 3 and parts[1] in OOD_ROLES:
            if len(parts) == 3:
                if _is_image(rel):
                    raise DataError(f"image '{rel}' under {root} is not in a set folder; expected "
                                    f"ood/{parts[1]}/<set>/<image>")
                continue
            ood[parts[1]].setdefault(parts[2], [])
            if _is_image(rel):
                ood[parts[1]][parts[2]].append((rel, f"set '{parts[1]}/{parts[2]}'"))
    if storage.remote(storage.local(root)) is None:  # a local folder may hold empty class or set folders
        for split in images:
            for d in (Path(root) / split).glob("*/"):
                folders_seen[split].add(d.name)
        for role in OOD_ROLES:
            for d in (Path(root) / "ood" / role).glob("*/"):
                ood[role].setdefault(d.name, [])
    empty_sets = [f"ood/{r}/{s}/" for r in OOD_ROLES for s, v in ood[r].items() if not v]
    if empty_sets:
        raise DataError(f"OOD set {empty_sets[0]} under {root} holds no image ({', '.join(IMAGE_SUFFIXES)}); "
                        f"remove the folder or add images")
    if not images["train"]:
        raise DataError(f"data.root '{root}' holds no training image; expected train/<class>/<image> "
                        f"({', '.join(IMAGE_SUFFIXES)}), and test/<class>/, ood/val/<set>/, ood/near|far/<set>/")
    classes_txt = storage.read_text(f"{root.rstrip('/')}/classes.txt")
    folders, names = _class_list(classes_txt, sorted(folders_seen["train"]), f"{root.rstrip('/')}/classes.txt")
    index = {f: i for i, f in enumerate(folders)}
    has_val = bool(folders_seen["val"])
    for split in images:
        for f in sorted(folders_seen[split]):
            if f not in index:
                what = "is not listed in classes.txt" if classes_txt is not None else "has no folder in train/"
                raise DataError(f"class folder '{split}/{f}/' under {root} {what}: labels are those of train/ "
                                f"({', '.join(folders)})")

    def ordered(items: list[tuple[str, str]]) -> list[tuple[str, int, str]]:
        return [(rel, index[c], f"class '{c}' of {rel.split('/')[0]}/")
                for rel, c in sorted(items, key=lambda it: (Path(it[0]).name, it[0]))]

    lay = Layout(root=root, folders=folders, names=names, splits={s: ordered(v) for s, v in images.items()},
                 ood={r: {s: sorted(v, key=lambda it: (Path(it[0]).name, it[0])) for s, v in sorted(ood[r].items())}
                      for r in OOD_ROLES if ood[r]})
    _check(lay, has_val, lambda split, c: f"expected {split}/{folders[c]}/<image>")
    if not has_val:
        _draw_val(lay, cfg.val_fraction, cfg.split_seed)
    _cap(lay, cfg.train_per_class, cfg.split_seed)
    return lay


def _ood_lines(text: str, where: str) -> list[tuple[str, str]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            head, _, tail = line.strip().rpartition(" ")
            out.append((head if head and tail.lstrip("-").isdigit() else line.strip(), f"line {n} of {where}"))
    return out


def scan_imglist(cfg: DataConfig) -> Layout:
    """The lists under data.imglist; image paths stay relative to data.root."""
    lists = str(cfg.imglist).rstrip("/")
    listed = storage.inventory(lists)
    if not listed and storage.remote(storage.local(lists)) is None and not Path(lists).is_dir():
        raise DataError(f"data.imglist '{lists}' is not a folder; expected train.txt, test.txt and ood/val/<set>.txt")
    splits: dict[str, list[tuple[str, int, str]]] = {}
    for split in ("train", "val", "test"):
        where = f"{lists}/{split}.txt"
        text = storage.read_text(where)
        if text is None:
            if split == "val":
                continue
            raise DataError(f"image list '{where}' does not exist; data.imglist needs train.txt and test.txt "
                            f"(`<path under data.root> <label>` lines)")
        lines = [(path, label, f"line {n} of {where}") for n, path, label in list_lines(text, where)]
        if not lines:
            raise DataError(f"image list '{where}' names no image")
        splits[split] = lines
    text = storage.read_text(f"{lists}/classes.txt")
    labels = sorted({label for _, label, _ in splits["train"]})
    n_classes = max(labels) + 1
    names = [ln.strip() for ln in text.splitlines() if ln.strip()] if text is not None else \
        [f"class {i}" for i in range(n_classes)]
    for split_items in splits.values():
        for _, index, at in split_items:
            if not 0 <= index < len(names):
                raise DataError(f"{at}: label {index} is out of range; expected 0..{len(names) - 1} "
                                f"({'classes.txt names' if text is not None else 'train.txt has'} {len(names)} "
                                f"classes)")
    ood: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for rel in sorted(listed):
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == "ood" and parts[1] in OOD_ROLES and parts[2].endswith(".txt"):
            where = f"{lists}/{rel}"
            items = _ood_lines(storage.read_text(where) or "", where)
            if not items:
                raise DataError(f"OOD list '{where}' names no image; remove it or add `<path> <label>` lines")
            ood.setdefault(parts[1], {})[parts[2][:-len(".txt")]] = items
    lay = Layout(root=str(cfg.root), folders=[str(i) for i in range(len(names))], names=names, splits=splits, ood=ood)
    _check(lay, "val" in splits, lambda split, c: f"no line of {lists}/{split}.txt has label {c}")
    if "val" not in splits:
        _draw_val(lay, cfg.val_fraction, cfg.split_seed)
    _cap(lay, cfg.train_per_class, cfg.split_seed)
    return lay


def scan(cfg: DataConfig) -> Layout:
    return scan_imglist(cfg) if cfg.benchmark == "imglist" else scan_folder(cfg)


def content_id(cfg: DataConfig) -> str:
    """What identifies the data a folder or imglist dataset reads, for stage fingerprints: every file's name and
    version (ETag in the store; size and time on disk) under data.root (folder) or data.imglist (imglist: the
    lists; the images under data.root are named by them)."""
    where = cfg.imglist if cfg.benchmark == "imglist" else cfg.root
    blob = "\n".join(f"{k} {v}" for k, v in sorted(storage.inventory(str(where)).items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_knn(lay: Layout, knn: KNNConfig) -> None:
    """Every class has enough training images for the k-NN stage (k neighbours besides itself, `select` points)."""
    need = max(knn.k + 1, knn.select)
    for c, n in enumerate(lay.counts("train")):
        if n < need:
            raise DataError(f"class '{lay.folders[c]}' has {n} training images; the k-NN stage needs at least {need} "
                            f"(knn.k={knn.k} + 1, knn.select={knn.select}): add images, or lower knn.k and knn.select")


def _measure(ds: ImageFiles, size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to MEASURE_IMAGES training images (evenly spaced) at the model's size."""
    picks = np.linspace(0, len(ds) - 1, min(len(ds), MEASURE_IMAGES)).round().astype(int)
    x = torch.stack([square(pixels(ds._read(int(i))), size) for i in np.unique(picks)])  # (N, 3, S, S)
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def build(cfg: DataConfig) -> Benchmark:
    lay = scan(cfg)
    wanted = {p for items in lay.splits.values() for p, _, _ in items}
    wanted |= {p for sets in lay.ood.values() for items in sets.values() for p, _ in items}
    base = storage.local(lay.root)
    # in the store: fetched into this node's cache (once per version); on disk: read where they are
    files = storage.sync(lay.root, wanted=wanted) if storage.remote(base) is not None else {}

    def dataset(items: list[tuple[str, int, str]], source: str, tf: Pixels | None) -> ImageFiles:
        return ImageFiles([(files.get(p, base / p), label) for p, label, _ in items], [w for _, _, w in items],
                          tf or Pixels(cfg.image_size, (0.5,), (0.5,)), cfg.on_bad_image, source, check=True)

    train = dataset(lay.splits["train"], f"{lay.root} train", None)
    measured = cfg.mean is None or cfg.std is None
    mean, std = _measure(train, cfg.image_size) if measured else ((), ())
    mean = tuple(cfg.mean) if cfg.mean is not None else mean
    std = tuple(cfg.std) if cfg.std is not None else std
    tf = Pixels(cfg.image_size, mean, std)
    train.transform = tf
    sets: dict[str, dict[str, Dataset]] = {
        r: {s: dataset([(p, -1, w) for p, w in items], f"{lay.root} ood/{r}/{s}", tf) for s, items in v.items()}
        for r, v in lay.ood.items()}
    info: dict[str, Any] = {"root": lay.root, "classes": lay.folders, "image_size": cfg.image_size,
            "mean": list(mean) if len(mean) == 3 else list(mean) * 3,
            "std": list(std) if len(std) == 3 else list(std) * 3,
            "normalisation": "measured on the training images" if measured else "given (data.mean, data.std)",
            "validation": lay.val_note, "training_images_per_class": lay.counts("train")}
    bench = Benchmark(name=cfg.benchmark, class_names=lay.names, train=train, train_plain=train,
                      val=dataset(lay.splits["val"], f"{lay.root} val", tf),
                      test=dataset(lay.splits["test"], f"{lay.root} test", tf),
                      ood_val=sets.get("val", {}), near=sets.get("near", {}), far=sets.get("far", {}),
                      norm=(tuple(info["mean"]), tuple(info["std"])), info=info)
    log.info("%s dataset %s: %d classes, %d/%d/%d train/val/test images, OOD sets %s; mean %s std %s (%s)",
             cfg.benchmark, lay.root, len(lay.names), len(train), len(lay.splits["val"]), len(lay.splits["test"]),
             {r: sorted(v) for r, v in lay.ood.items()}, info["mean"], info["std"], info["normalisation"])
    return bench


register("folder")(build)
register("imglist")(build)


def _png(x: np.ndarray, path: Path) -> None:
    """A grey image, uint8 or float in [0, 1], as an 8-bit PNG."""
    from PIL import Image

    a = x if x.dtype == np.uint8 else np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def export(name: str, cfg: DataConfig, dest: str) -> dict[str, int]:
    """Write the embedded benchmark `name` (its split under `cfg`) in the folder layout, with classes.txt and an
    imglist/ folder of lists for the same files, into `dest` (a new or empty local folder, or an s3:// prefix).
    Images keep their source size (8-bit grey PNGs; float images rounded to 1/255); file names are the images'
    positions in their split, so that a folder or imglist run reads them in the embedded benchmark's order."""
    if name not in ARRAYS:
        raise ValueError(f"cannot export '{name}'; exportable: {', '.join(sorted(ARRAYS))}")
    a = ARRAYS[name](cfg)
    folders = [n.replace(" ", "_").replace("/", "_") for n in a.class_names]
    in_store = dest.startswith("s3://")
    if not in_store and Path(dest).exists() and any(Path(dest).iterdir()):
        raise FileExistsError(f"'{dest}' exists and is not empty; export into a new or empty folder")
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=None if in_store else Path(dest).absolute().parent))
    counts: dict[str, int] = {}
    lists: dict[str, list[str]] = {}
    for split, (x, y) in (("train", a.train), ("val", a.val), ("test", a.test)):
        width = len(str(len(x)))
        for i, (img, label) in enumerate(zip(x, y)):
            rel = f"{split}/{folders[int(label)]}/{i:0{width}d}.png"
            _png(img, tmp / rel)
            lists.setdefault(f"{split}.txt", []).append(f"{rel} {int(label)}")
        counts[split] = len(x)
    for role, sets in (("val", a.ood_val), ("near", a.near), ("far", a.far)):
        for s, x in sets.items():
            width = len(str(len(x)))
            for i, img in enumerate(x):
                rel = f"ood/{role}/{s}/{i:0{width}d}.png"
                _png(img, tmp / rel)
                lists.setdefault(f"ood/{role}/{s}.txt", []).append(f"{rel} -1")
            counts[f"ood/{role}/{s}"] = len(x)
    for rel, lines in lists.items():
        (tmp / "imglist" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "imglist" / rel).write_text("\n".join(lines) + "\n")
    (tmp / "imglist" / "classes.txt").write_text("\n".join(a.class_names) + "\n")
    (tmp / "classes.txt").write_text("".join(f"{f} {n}\n" for f, n in zip(folders, a.class_names)))
    if in_store:
        upload_tree(tmp, dest)
        shutil.rmtree(tmp)
    else:
        if Path(dest).exists():
            Path(dest).rmdir()
        tmp.rename(dest)  # whole or not at all
    return counts


def upload_tree(tmp: Path, dest: str, threads: int = storage.SYNC_THREADS) -> None:
    """Every file under `tmp` to the prefix `dest`; the class lists last (a reader finds images before them)."""
    from concurrent.futures import ThreadPoolExecutor

    bucket, _, prefix = dest[len("s3://"):].partition("/")
    files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (p.name == "classes.txt", str(p)))
    client = storage.client()

    def put(p: Path) -> None:
        client.upload_file(str(p), bucket, "/".join(x for x in (prefix.strip("/"), p.relative_to(tmp).as_posix()) if x))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, [p for p in files if p.name != "classes.txt"]))
    for p in files:
        if p.name == "classes.txt":
            put(p)
