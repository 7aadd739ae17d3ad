"""Your own data: data.benchmark=folder and imglist (oal/data/folder.py), from an exported embedded benchmark and
from folders written here in the real on-disk formats (PNG, JPEG; grey and colour; any size)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oal import registry, storage
from oal.config import DataConfig, KNNConfig, load_config
from oal.data import DataError, build_benchmark
from oal.data.folder import check_knn, content_id, export, scan, upload_tree
from tests.conftest import QUICK

HALF = {"mean": [0.5], "std": [0.5]}  # the embedded benchmarks' normalisation


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("own") / "digits"
    counts = export("digits", DataConfig(benchmark="digits"), str(d))
    assert counts == {"train": 649, "val": 108, "test": 326, "ood/val/digit9": 180, "ood/near/digits678": 534,
                      "ood/far/photo_patches": 400, "ood/far/noise": 300}
    return d


def _all(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def test_an_exported_benchmark_reads_back_as_folder_and_imglist_in_its_order(digits_dir):
    ref = build_benchmark(DataConfig(benchmark="digits", image_size=16))
    folder = build_benchmark(DataConfig(benchmark="folder", root=str(digits_dir), image_size=16, **HALF))
    lists = build_benchmark(DataConfig(benchmark="imglist", root=str(digits_dir), imglist=str(digits_dir / "imglist"),
                                       image_size=16, **HALF))
    assert folder.class_names == lists.class_names == ref.class_names
    assert set(folder.near) == {"digits678"} and set(folder.far) == {"photo_patches", "noise"}
    assert set(folder.ood_val) == {"digit9"} and set(lists.far) == set(folder.far)
    for split in ("train", "val", "test"):
        (xr, yr), (xf, yf), (xl, yl) = (_all(getattr(b, split)) for b in (ref, folder, lists))
        assert torch.equal(yr, yf) and torch.equal(yf, yl)  # same labels in the same order
        assert torch.equal(xf, xl)
        # digits are floats in sixteenths: the 8-bit PNG rounds each to 1/255 (2/255 after the 0.5 normalisation)
        assert (xr - xf).abs().max() <= 2 / 255 + 1e-6
    (xr, _), (xf, yf) = _all(ref.far["noise"]), _all(folder.far["noise"])
    assert (xr - xf).abs().max() <= 2 / 255 + 1e-6 and (yf == -1).all()
    assert folder.info["validation"] == "given" and folder.info["normalisation"].startswith("given")


def test_colour_jpeg_and_png_of_any_size_are_squared_and_the_normalisation_measured(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c, colour in (("red_things", (200, 30, 30)), ("blue_things", (30, 30, 200))):
            for i in range(n):
                a = np.clip(np.array(colour) + rng.integers(-20, 20, (40 + 8 * i, 24 + 4 * i, 3)), 0, 255)
                Image.fromarray(a.astype(np.uint8)).save(tmp_path / _mk(tmp_path, f"{split}/{c}/{i}.jpg"))
    Image.fromarray(rng.integers(0, 255, (30, 50), dtype=np.uint8)).save(_mk(tmp_path, "ood/val/grey/a.png"))
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8)).save(_mk(tmp_path, "ood/far/rgba/b.png"))
    (tmp_path / "notes.txt").write_text("not an image, not in a split: ignored")
    b = build_benchmark(DataConfig(benchmark="folder", root=str(tmp_path), image_size=12))
    assert b.class_names == ["blue things", "red things"]  # folder names by name, '_' as ' '
    x, y = _all(b.train)
    assert x.shape == (len(b.train), 3, 12, 12) and sorted(y.tolist()) == [0] * len(y[y == 0]) + [1] * len(y[y == 1])
    # validation drawn from training (no val/): one of each class's 4, seeded, the rest kept for training
    assert len(b.val) == 2 and len(b.train) == 6 and "drawn: 2" in b.info["validation"]
    # measured on the training images: red and blue channels high on half of them, green low on all
    mean, std = b.info["mean"], b.info["std"]
    assert 0.4 < mean[0] < 0.6 and mean[1] < 0.2 and 0.4 < mean[2] < 0.6 and min(std) > 0
    assert b.info["normalisation"] == "measured on the training images"
    assert abs(float(x[:, 0].mean())) < 0.3  # normalised by what was measured
    assert _all(b.ood_val["grey"])[0].shape[1:] == (3, 12, 12) and _all(b.far["rgba"])[0].shape[1:] == (3, 12, 12)
    # a display name from classes.txt, and its order is the label order
    (tmp_path / "classes.txt").write_text("red_things a red thing\nblue_things\n")
    b2 = build_benchmark(DataConfig(benchmark="folder", root=str(tmp_path), image_size=12))
    assert b2.class_names == ["a red thing", "blue things"]


def _mk(root: Path, rel: str) -> Path:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    return root / rel


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda d: shutil.rmtree(d / "test" / "three"), "class 'three' has no image in test (expected test/three/<image>)"),
    (lambda d: (d / "ood" / "near" / "digits678").mkdir(exist_ok=True) or
     [p.unlink() for p in (d / "ood" / "near" / "digits678").iterdir()], "OOD set ood/near/digits678/ under"),
    (lambda d: shutil.rmtree(d / "ood" / "val"), "no validation OOD set in"),
    (lambda d: (d / "test" / "seven").mkdir(), "class folder 'test/seven/' under"),
    (lambda d: (d / "train" / "0007.png").write_bytes(b"x"), "image 'train/0007.png' under"),
    (lambda d: (d / "train" / "four" / "042.png").write_bytes(b"not a png"), "four/042.png' (class 'four' of train/)"
     " cannot be read: UnidentifiedImageError"),
])
def test_each_layout_error_names_the_class_set_or_file(digits_dir, tmp_path, damage, message):
    d = _copy(digits_dir, tmp_path / "d")
    damage(d)
    with pytest.raises(DataError) as e:
        build_benchmark(DataConfig(benchmark="folder", root=str(d), **HALF))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_unreadable_image_is_skipped_and_counted_with_on_bad_image_skip(digits_dir, tmp_path):
    d = _copy(digits_dir, tmp_path / "d")
    (d / "train" / "four" / "042.png").write_bytes(b"not a png")
    (d / "ood" / "far" / "noise" / "000.png").write_bytes(b"")
    b = build_benchmark(DataConfig(benchmark="folder", root=str(d), on_bad_image="skip", **HALF))
    assert (len(b.train), b.train.skipped) == (648, 1) and (len(b.far["noise"]), b.far["noise"].skipped) == (299, 1)


def test_imglist_errors_name_the_list_line(digits_dir, tmp_path):
    lists = _copy(digits_dir / "imglist", tmp_path / "lists")
    base = dict(benchmark="imglist", root=str(digits_dir), imglist=str(lists), **HALF)
    lines = (lists / "test.txt").read_text().splitlines()
    (lists / "test.txt").write_text("\n".join(lines[:3] + [lines[3].rsplit(" ", 1)[0] + " 6"] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"test.txt: label 6 is out of range; expected 0..5 \(classes.txt names 6"):
        build_benchmark(DataConfig(**base))
    (lists / "test.txt").write_text("\n".join(ln for ln in lines if not ln.endswith(" 2")) + "\n")
    with pytest.raises(DataError, match=r"class '2' has no image in test \(no line of .*test.txt has label 2\)"):
        build_benchmark(DataConfig(**base))
    (lists / "test.txt").write_text("\n".join(["train/zero/missing.png 0"] + lines) + "\n")
    with pytest.raises(DataError, match=r"missing.png' \(line 1 of .*test.txt\) cannot be read: FileNotFoundError"):
        build_benchmark(DataConfig(**base))
    (lists / "ood" / "far" / "noise.txt").write_text("\n")
    with pytest.raises(DataError, match=r"OOD list '.*noise.txt' names no image"):
        build_benchmark(DataConfig(**base))


def test_a_class_too_small_for_knn_is_named_before_any_stage_runs(digits_dir, tmp_path):
    d = _copy(digits_dir, tmp_path / "d")
    for p in sorted((d / "train" / "two").iterdir())[3:]:
        p.unlink()
    lay = scan(DataConfig(benchmark="folder", root=str(d)))
    assert lay.counts() == [107, 109, 3, 110, 108, 109]
    with pytest.raises(DataError, match=r"class 'two' has 3 training images; the k-NN stage needs at least 6 "
                                        r"\(knn.k=5 \+ 1, knn.select=5\)"):
        check_knn(lay, KNNConfig(k=5, select=5))
    cfg = load_config("digits", [*QUICK, "data.benchmark=folder", f"data.root={d}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(DataError, match="class 'two' has 3 training images"):
        registry.run_pipeline(cfg, progress=False)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_the_digits_smoke_pipeline_runs_from_an_exported_folder_and_reruns_when_a_file_changes(digits_dir, tmp_path):
    d = _copy(digits_dir, tmp_path / "d")
    out = tmp_path / "out"
    args = [*QUICK, "data.benchmark=folder", f"data.root={d}", "data.mean=[0.5]", "data.std=[0.5]",
            f"output_dir={out}", "--no-progress"]
    r = subprocess.run([sys.executable, "-m", "oal", "pipeline", *args], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "digits" / "eval" / "results.json").read_text())
    assert res["benchmark"] == "folder" and res["near_sets"] == ["digits678"]
    assert res["far_sets"] == ["noise", "photo_patches"] and 0.5 < res["id_accuracy"] <= 1
    manifest = json.loads((out / "digits" / "eval" / "stage.json").read_text())
    assert manifest["data"]["root"] == str(d) and manifest["data"]["mean"] == [0.5, 0.5, 0.5]
    cfg = load_config("digits", args[:-1])
    before = content_id(cfg.data), registry.fingerprint("teacher", cfg)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "train" / "one" / "9999.png")  # one more training image
    assert content_id(cfg.data) != before[0] and registry.fingerprint("teacher", cfg) != before[1]


def _small(src: Path, dst: Path, per_folder: int = 6) -> Path:
    """A copy of an exported tree with the first `per_folder` images of each class and set folder."""
    for folder in {f.parent for f in src.rglob("*.png")}:
        for f in sorted(folder.iterdir())[:per_folder]:
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst / f.relative_to(src))
    shutil.copyfile(src / "classes.txt", dst / "classes.txt")
    return dst


@pytest.mark.stack
def test_a_folder_in_s3_is_fetched_once_per_node_and_reads_as_the_local_one(digits_dir, tmp_path, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="oal.storage")
    from tests.test_storage import S3Server

    server = S3Server(tmp_path)
    try:
        for k, v in {"AWS_ENDPOINT_URL_S3": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                     storage.OBJECT_CACHE_ENV: str(tmp_path / "node-a")}.items():
            monkeypatch.setenv(k, v)
        storage.client().create_bucket(Bucket="data")
        small = _small(digits_dir, tmp_path / "small")
        images = len(list(small.rglob("*.png")))
        assert images == 6 * (3 * 6 + 4)  # 6 in each class folder of train, val, test and each of the 4 OOD sets
        upload_tree(small, "s3://data/digits")
        calls: list[str] = []
        real = storage.client().download_file
        monkeypatch.setattr(storage.client(), "download_file", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
        cfg = DataConfig(benchmark="folder", root="s3://data/digits", image_size=16, **HALF)
        b = build_benchmark(cfg)
        assert len(calls) == images  # every image once (classes.txt is read, not fetched)
        assert f"fetching {images} of {images} objects" in caplog.text  # what the worker's log says it waits for
        local = build_benchmark(DataConfig(benchmark="folder", root=str(small), image_size=16, **HALF))
        for split in ("train", "val", "test"):
            assert torch.equal(_all(getattr(b, split))[0], _all(getattr(local, split))[0])
        assert list(b.far) == list(local.far) and len(b.far["noise"]) == 6
        build_benchmark(cfg)
        assert len(calls) == images and caplog.text.count("fetching ") == 1  # the second build fetched nothing
        first = content_id(cfg)
        storage.client().put_object(Bucket="data", Key="digits/train/one/999.png",
                                    Body=sorted((small / "train" / "one").iterdir())[0].read_bytes())
        assert content_id(cfg) != first
        b = build_benchmark(cfg)
        assert calls[-1] == "digits/train/one/999.png" and len(calls) == images + 1  # only the new object
        assert len(b.train) == len(local.train) + 1
    finally:
        server.stop()


def test_a_non_square_image_is_resized_by_its_shorter_side_and_centre_cropped():
    from oal.images import square

    t = torch.zeros(1, 20, 60)
    t[:, :, 20:40] = 1.0  # the middle third of a wide image is bright
    s = square(t, 10)  # 20 x 60 -> 10 x 30, then the middle 10 columns
    assert s.shape == (1, 10, 10) and torch.allclose(s, torch.ones(1, 10, 10))
    tall = square(torch.arange(60.0).view(1, 60, 1).expand(1, 60, 20), 10)  # 60 x 20 -> 30 x 10, middle rows
    assert tall.shape == (1, 10, 10) and 20 < float(tall.mean()) < 40
    same = torch.rand(3, 10, 10)
    assert square(same, 10) is same  # a square image of the model's size is left as it is
