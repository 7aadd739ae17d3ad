"""The fashion benchmark: idx files read offline from a folder, a disjoint split, one clear error per bad file."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oal.config import DataConfig
from oal.data import build_benchmark, fashion, grey_images


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> Path:
    """An idx file of unsigned bytes, as Fashion-MNIST ships them: magic, dimensions (big-endian), data."""
    header = (0x800 + arr.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_fashion_folder(d: Path, train_per_class: int = 1300, test_per_class: int = 20, compress: bool = True,
                        seed: int = 0) -> Path:
    """The four idx files of a small Fashion-MNIST look-alike: each class a different brightness, 28x28."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_per_class), ("t10k", test_per_class)):
        y = np.repeat(np.arange(10), n)
        rng.shuffle(y)
        x = np.clip(rng.normal(20 * y[:, None, None] + 30, 10, (len(y), 28, 28)), 0, 255)
        write_idx(d / f"{split}-images-idx3-ubyte", x, compress)
        write_idx(d / f"{split}-labels-idx1-ubyte", y, compress)
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_fashion_folder(tmp_path_factory.mktemp("fashion"))


def _labels(ds) -> torch.Tensor:
    return ds.tensors[1]


def test_builds_from_a_folder_of_idx_files(folder, monkeypatch, tmp_path):
    monkeypatch.setenv("OAL_DATA_DIR", str(tmp_path / "empty-cache"))  # never the machine's own cache
    b = build_benchmark(DataConfig(benchmark="fashion", root=str(folder), train_per_class=100, image_size=32))
    assert b.class_names == ["t-shirt", "trouser", "pullover", "dress", "coat", "shirt"]
    assert len(b.train) == 600 and len(b.val) == 6 * fashion.VAL_PER_CLASS and len(b.test) == 6 * 20
    assert torch.bincount(_labels(b.train), minlength=6).tolist() == [100] * 6
    x, _ = b.train[0]
    assert x.shape == (3, 32, 32) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert len(b.near["footwear"]) == 3 * 20 and len(b.ood_val["bag"]) == fashion.OOD_VAL_IMAGES
    assert set(b.far) == {"digits", "photo_patches", "noise"}
    assert all(int(t) == -1 for ds in (*b.near.values(), *b.far.values(), *b.ood_val.values()) for t in _labels(ds))


def test_class_roles_are_disjoint_and_cover_the_dataset():
    roles = [set(fashion.ID_CLASSES), set(fashion.VAL_OOD_CLASSES), set(fashion.NEAR_CLASSES)]
    assert sum(len(r) for r in roles) == 10 and set().union(*roles) == set(range(10))


def test_index_sets_are_disjoint_and_hold_only_their_classes(folder):
    _, y = fashion.load_split(folder, "train")
    idx = fashion.split_indices(y, 100, seed=3)
    names = list(idx)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(idx[a].tolist()) & set(idx[b].tolist()), f"{a} and {b} share images"
    assert set(y[idx["train"]].tolist()) == set(fashion.ID_CLASSES) == set(y[idx["val"]].tolist())
    assert set(y[idx["ood_val"]].tolist()) == set(fashion.VAL_OOD_CLASSES) == set(y[idx["real_outliers"]].tolist())
    again = fashion.split_indices(y, 100, seed=3)
    assert all(np.array_equal(idx[k], again[k]) for k in idx), "the split must depend on the seed only"


def test_test_sets_come_from_the_test_split_and_their_roles(folder):
    b = build_benchmark(DataConfig(benchmark="fashion", root=str(folder), train_per_class=50))
    x_te, y_te = fashion.load_split(folder, "test")
    near = grey_images(x_te[np.isin(y_te, fashion.NEAR_CLASSES)], 32)
    assert torch.equal(b.near["footwear"].tensors[0], near)
    assert torch.equal(b.test.tensors[0], grey_images(x_te[np.isin(y_te, fashion.ID_CLASSES)], 32))


def test_torchvision_raw_layout_and_plain_files(tmp_path):
    make_fashion_folder(tmp_path / "FashionMNIST" / "raw", train_per_class=1300, compress=False)
    assert fashion.find_dir(str(tmp_path)) == tmp_path / "FashionMNIST" / "raw"
    x, y = fashion.load_split(fashion.find_dir(str(tmp_path)), "test")
    assert x.shape == (200, 28, 28) and y.shape == (200,)


def test_the_fetch_entry_point_uses_files_already_there_offline(folder, tmp_path):
    """`python -m oal.data fashion` finds the idx files in its cache and downloads nothing."""
    cache = tmp_path / "cache"
    target = cache / "fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"
    make_fashion_folder(target)
    env = {"OAL_DATA_DIR": str(cache), "PATH": "/nonexistent"}  # no apt-get reachable: a download would fail
    out = subprocess.run([sys.executable, "-m", "oal.data", "fashion"], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert f"Fashion-MNIST idx files: {target}" in out.stdout and "train: 13000 images 28x28" in out.stdout
    assert "fetching" not in out.stdout


def test_missing_files_name_every_place_looked_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("OAL_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "no-debian")
    with pytest.raises(FileNotFoundError, match=r"python -m oal.data fashion") as e:
        fashion.find_dir(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value) and "data.root" in str(e.value)


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"truncated or padded: its header promises \[20, 28, 28\]"),
    ("bad_gzip", r"cannot be read"),
    ("wrong_magic", r"does not start with the idx header"),
])
def test_a_corrupt_or_truncated_idx_file_is_one_clear_error_naming_it(tmp_path, damage, message):
    d = make_fashion_folder(tmp_path / "f", train_per_class=2, test_per_class=2)
    bad = d / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(bad.read_bytes())
    if damage == "truncate":
        bad.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "bad_gzip":
        bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    else:
        bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))
    with pytest.raises(ValueError, match=message) as e:
        build_benchmark(DataConfig(benchmark="fashion", root=str(d), train_per_class=1))
    assert str(bad) in str(e.value)


def test_labels_and_images_that_disagree_are_an_error(tmp_path):
    d = make_fashion_folder(tmp_path / "f", train_per_class=2, test_per_class=2)
    write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(5))
    with pytest.raises(ValueError, match=r"20 images but 5 labels"):
        fashion.load_split(d, "test")
