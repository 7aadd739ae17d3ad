from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oal.config import DataConfig
from oal.data import BENCHMARKS, build_benchmark
from oal.data.cifar import ImageList


def _rows(ds):
    return {tuple(np.round(x[0, ::4, ::4].numpy(), 4).ravel()) for x, _ in ds}


def test_digits_splits():
    b = build_benchmark(DataConfig(image_size=16))
    assert b.num_classes == 6 and b.class_names[0] == "zero"
    x, y = b.train[0]
    assert x.shape == (3, 16, 16) and -1.0 <= x.min() and x.max() <= 1.0
    ytr = torch.stack([y for _, y in b.train])
    yte = torch.stack([y for _, y in b.test])
    assert set(ytr.tolist()) == set(range(6)) == set(yte.tolist())
    # stratified: every class holds ~60% of its images in train (+-1 image)
    counts_tr, counts_te = torch.bincount(ytr), torch.bincount(yte)
    assert ((counts_tr.float() / (counts_tr + counts_te + torch.bincount(torch.stack([y for _, y in b.val]))))
            .sub(0.6).abs() < 0.02).all()
    assert len(b.train) + len(b.val) + len(b.test) == 178 + 182 + 177 + 183 + 181 + 182  # digits 0-5 in sklearn's set
    # ID splits are disjoint
    assert not (_rows(b.train) & _rows(b.test))
    assert not (_rows(b.train) & _rows(b.val))
    # OOD sets are labelled -1; validation OOD is disjoint from every test OOD set
    for ds in [*b.near.values(), *b.far.values(), *b.ood_val.values()]:
        assert all(int(y) == -1 for _, y in ds)
    val_rows = _rows(b.ood_val["digit9"])
    for ds in [*b.near.values(), *b.far.values()]:
        assert not (val_rows & _rows(ds))
    assert set(b.near) == {"digits678"} and set(b.far) == {"photo_patches", "noise"}


def test_grey_sets_convert_only_the_blocks_read_and_give_what_grey_images_gives(monkeypatch):
    from oal.data import GreyImages, grey_images
    from oal.evaluate import shard

    monkeypatch.setattr(GreyImages, "BLOCK", 100)
    raw = np.random.default_rng(0).integers(0, 256, (350, 8, 8), dtype=np.uint8)
    ds = GreyImages(raw, torch.arange(350), 16)
    second = shard(ds, 1, 2)  # images 175..349: blocks 1, 2 and 3
    items = [second[i] for i in range(len(second))]
    assert sorted(ds._blocks) == [1, 2, 3]  # block 0 (images 0..99) was never read, so never converted
    whole = grey_images(raw, 16)  # (350, 3, 16, 16)
    assert torch.equal(torch.stack([x for x, _ in items]), whole[175:])  # image for image, labels with them
    assert [int(y) for _, y in items] == list(range(175, 350))
    assert torch.equal(ds[-1][0], whole[-1])
    assert torch.equal(ds.tensors[0], whole) and torch.equal(ds.tensors[1], torch.arange(350))
    with pytest.raises(IndexError, match="image 350 of a set of 350"):
        ds[350]
    with pytest.raises(ValueError, match="350 grey images but 3 labels"):
        GreyImages(raw, torch.arange(3), 16)


def test_digits_is_seeded():
    a, b = build_benchmark(DataConfig()), build_benchmark(DataConfig())
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    c = build_benchmark(DataConfig(split_seed=1))
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_folder_names_expected_path(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)) as e:
        build_benchmark(DataConfig(benchmark=name, root=str(tmp_path)))
    assert "nothing is downloaded" in str(e.value)


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="registered: cifar10, cifar100, digits"):
        build_benchmark(DataConfig(benchmark="mnist"))


def _openood_tree(root: Path) -> Path:
    """A tiny OpenOOD v1.5 tree: every list of cifar10, cifar100 and imagenet200 (each class once in the ID lists),
    all pointing at 12x12 PNGs."""
    from oal.data.cifar import OPENOOD_SPLITS

    root.mkdir()
    Image.fromarray(np.full((12, 12, 3), 200, dtype=np.uint8)).save(root / "img.png")
    for images in ("images_classic", "images_largescale"):
        (root / images).mkdir()
        Image.open(root / "img.png").save(root / images / "x.png")
    wnids = ("n01443537", "n01440764")  # goldfish, tench
    for folder in wnids:
        (root / "images_largescale" / "imagenet_1k" / "train" / folder).mkdir(parents=True)
        Image.open(root / "img.png").save(root / "images_largescale" / "imagenet_1k" / "train" / folder / "a.png")
    for name, k in (("cifar10", 10), ("cifar100", 100), ("imagenet200", 2)):
        lists = root / "benchmark_imglist" / name
        lists.mkdir(parents=True)
        ood = [stem for split in OPENOOD_SPLITS[name] for stem in split.values()]
        for stem in ood + [f"val_{name}", f"test_{name}"]:
            (lists / f"{stem}.txt").write_text("x.png 0\nx.png 0\n")
        if name == "imagenet200":
            lines = [f"imagenet_1k/train/{w}/a.png {i}" for i, w in enumerate(wnids)]
        else:
            lines = [f"x.png {i}" for i in range(k)]
        (lists / f"train_{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_every_registered_benchmark_has_a_builder(tmp_path, monkeypatch):
    """Each registered name builds a whole benchmark from its own data format (tiny stand-ins here): ID splits
    of images at data.image_size, its classes, and for OpenOOD lists the near and far OOD sets."""
    from oal.data.cifar import OPENOOD_SPLITS
    from oal.data.fashion import PROBED, SPLITS
    from oal.data.folder import export
    from tests.test_fashion import make_fashion_folder

    splits = {**SPLITS, **PROBED}  # the fashion splits: one builder, each its own classes
    assert set(BENCHMARKS) == {"digits", "cifar10", "cifar100", "imagenet200", "folder", "imglist", *splits}
    monkeypatch.setenv("OAL_DATA_DIR", str(tmp_path / "empty-cache"))  # fashion never reads the machine's cache
    openood = _openood_tree(tmp_path / "openood")
    fashion = make_fashion_folder(tmp_path / "fashion", train_per_class=210, test_per_class=2)  # 200 for val
    configs = {"digits": DataConfig(image_size=16)}
    configs |= {n: DataConfig(benchmark=n, root=str(fashion), train_per_class=4, image_size=16) for n in splits}
    configs |= {n: DataConfig(benchmark=n, openood_root=str(openood), image_size=16)
                for n in ("cifar10", "cifar100", "imagenet200")}
    own = tmp_path / "own"
    export("digits", DataConfig(), str(own))  # the folder layout, and lists for the same files
    configs |= {"folder": DataConfig(benchmark="folder", root=str(own), image_size=16),
                "imglist": DataConfig(benchmark="imglist", root=str(own), imglist=str(own / "imglist"), image_size=16)}
    classes = {"digits": 6, "cifar10": 10, "cifar100": 100, "imagenet200": 2, "folder": 6, "imglist": 6}
    classes |= {n: len(sp.id_classes) for n, sp in splits.items()}
    for name, builder in BENCHMARKS.items():
        b = builder(configs[name])
        assert b.name == name
        assert b.num_classes == classes[name] and len(set(b.class_names)) == classes[name], name
        for split in (b.train, b.train_plain, b.val, b.test):
            x, y = split[0]
            assert tuple(x.shape) == (3, 16, 16) and 0 <= int(y) < classes[name], name
        assert len(b.train) == len(b.train_plain) > 0 and len(b.test) > 0, name
        if name in OPENOOD_SPLITS:
            val, near, far = OPENOOD_SPLITS[name]
            assert (set(b.ood_val), set(b.near), set(b.far)) == (set(val), set(near), set(far)), name
            x, y = b.far[next(iter(far))][1]
            assert tuple(x.shape) == (3, 16, 16) and y == -1
        else:
            assert b.near and b.far and all(int(y) == -1 for ds in (*b.near.values(), *b.far.values()) for _, y in ds)
    assert build_benchmark(configs["imagenet200"]).class_names == ["goldfish", "tench"]
    assert build_benchmark(configs["cifar10"]).class_names[:2] == ["airplane", "automobile"]


def test_openood_image_list(tmp_path):
    (tmp_path / "images_classic" / "svhn").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "images_classic" / "svhn" / f"{i}.png")
    lst = tmp_path / "test_svhn.txt"
    lst.write_text("".join(f"svhn/{i}.png {i}\n" for i in range(3)))
    import torchvision.transforms as T

    ds = ImageList(lst, tmp_path / "images_classic", T.ToTensor(), ood=True)
    assert len(ds) == 3
    x, y = ds[2]
    assert y == -1 and x.shape == (3, 8, 8) and abs(float(x.mean()) - 80 / 255) < 1e-6
    bad = tmp_path / "bad.txt"
    bad.write_text("svhn/0.png\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        ImageList(bad, tmp_path, T.ToTensor(), ood=True)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        ImageList(tmp_path / "missing.txt", tmp_path, T.ToTensor(), ood=True)
