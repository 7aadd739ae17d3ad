"""The real-format generators: an OpenOOD v1.5 tree and a tiny Stable-Diffusion diffusers folder."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.realdata import make_openood_tree, make_sd_folder

PROMPT = "A high-quality image of the apple"


def _read_list(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in path.read_text().splitlines():
        rel, label = line.split(" ")  # exactly one space: '<path> <label>'
        rows.append((rel, int(label)))
    return rows


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_openood_tree(tmp_path_factory.mktemp("openood"), "cifar100", train_per_class=2, size=32, seed=0)


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    from oal.config import DiffusionConfig
    from oal.diffusion import load_model

    path = make_sd_folder(tmp_path_factory.mktemp("sd") / "tiny-sd", cross_attention_dim=32, seed=0)
    return path, load_model(DiffusionConfig(model=str(path)), "cpu", 0)


@pytest.mark.parametrize("benchmark", ["cifar10", "cifar100"])
def test_tree_has_every_openood_list(tmp_path: Path, benchmark: str) -> None:
    from oal.data.cifar import OPENOOD_SPLITS

    info = make_openood_tree(tmp_path, benchmark, train_per_class=1, ood_per_set=2, size=16)
    lists = tmp_path / "benchmark_imglist" / benchmark
    ood_stems = {stem for split in OPENOOD_SPLITS[benchmark] for stem in split.values()}
    expected = {f"{s}_{benchmark}" for s in ("train", "val", "test")} | ood_stems
    assert {p.stem for p in lists.glob("*.txt")} == expected
    near = "test_cifar10" if benchmark == "cifar100" else "test_cifar100"
    assert near in ood_stems
    for stem in ood_stems:
        rows = _read_list(lists / f"{stem}.txt")
        assert len(rows) == 2 and all(label == -1 for _, label in rows)
    assert info["num_classes"] == (100 if benchmark == "cifar100" else 10)


def test_id_lists_are_well_formed(tree: dict) -> None:
    n, bench = tree["num_classes"], tree["benchmark"]
    train = _read_list(tree["lists"][f"train_{bench}"])
    val = _read_list(tree["lists"][f"val_{bench}"])
    test = _read_list(tree["lists"][f"test_{bench}"])
    assert Counter(label for _, label in train) == {c: 2 for c in range(n)}
    assert Counter(label for _, label in val) == {c: 1 for c in range(n)}
    assert Counter(label for _, label in test) == {c: 1 for c in range(n)}
    for rel, label in train + val + test:
        parts = rel.split("/")
        assert len(parts) == 4 and parts[0] == bench and parts[-1].endswith(".png")
        assert parts[2] == tree["class_names"][label]
    assert all(rel.split("/")[1] == "train" for rel, _ in train)
    assert all(rel.split("/")[1] == "test" for rel, _ in val + test)
    assert not {r for r, _ in val} & {r for r, _ in test}  # val is carved out of the test split
    assert [rel for rel, _ in test] == tree["test_paths"]
    assert [label for _, label in test] == tree["test_labels"]
    assert tree["counts"][f"test_{bench}"] == len(test) == n


def test_every_listed_png_opens_at_size(tree: dict) -> None:
    seen = 0
    for path in tree["lists"].values():
        for rel, _ in _read_list(path):
            with Image.open(tree["images_dir"] / rel) as img:
                assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
            seen += 1
    assert seen == sum(tree["counts"].values())
    assert len(list(tree["images_dir"].rglob("*.png"))) == seen  # no stray or shared files


def test_id_classes_are_separable_and_ood_differs(tree: dict) -> None:
    """Nearest class-mean colour on test images beats chance by far; MNIST-like images are grey."""
    def mean_rgb(rel: str) -> np.ndarray:
        with Image.open(tree["images_dir"] / rel) as img:
            return np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0)  # (3,)

    bench = tree["benchmark"]
    train = _read_list(tree["lists"][f"train_{bench}"])
    means = np.zeros((tree["num_classes"], 3))  # (C, 3)
    for rel, label in train:
        means[label] += mean_rgb(rel) / 2
    test = [mean_rgb(rel) for rel in tree["test_paths"]]  # N x (3,)
    pred = [int(np.argmin(((means - x) ** 2).sum(1))) for x in test]
    acc = np.mean(np.array(pred) == np.array(tree["test_labels"]))
    assert acc > 0.5  # chance is 0.01
    for rel, _ in _read_list(tree["lists"]["test_mnist"]):
        with Image.open(tree["images_dir"] / rel) as img:
            arr = np.asarray(img)
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all() and arr.max() >= 200


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_openood_tree(tmp_path / "a", "cifar10", train_per_class=1, ood_per_set=1, size=8, seed=3)
    b = make_openood_tree(tmp_path / "b", "cifar10", train_per_class=1, ood_per_set=1, size=8, seed=3)
    rel = a["test_paths"][0]
    assert (a["images_dir"] / rel).read_bytes() == (b["images_dir"] / rel).read_bytes()


def test_sd_folder_layout_and_size(sd: tuple) -> None:
    path, _ = sd
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (path / comp).is_dir() and index[comp][0] in ("diffusers", "transformers")
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "PNDMScheduler" and sched["skip_prk_steps"] is True
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert sched["steps_offset"] == 1 and sched["set_alpha_to_one"] is False
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size < 5 * 2**20


def test_sd_tokenizer_is_real_clip(sd: tuple) -> None:
    from transformers import CLIPTokenizer

    _, model = sd
    tok = model.tokenizer
    assert isinstance(tok, CLIPTokenizer) and tok.model_max_length == 77
    ids = tok(PROMPT)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|startoftext|>") == tok.bos_token_id
    assert ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>") == tok.eos_token_id
    words = tok.convert_ids_to_tokens(ids[1:-1])
    assert words == ["a</w>", "high</w>", "-</w>", "quality</w>", "image</w>", "of</w>", "the</w>", "apple</w>"]
    assert model.text_encoder.config.vocab_size == len(tok)
    assert model.text_encoder.config.eos_token_id == tok.eos_token_id


def test_sd_encode_prompts_shape(sd: tuple) -> None:
    import torch

    from oal.diffusion import encode_prompts

    _, model = sd
    assert model.cond_dim == 32 and model.latent_channels == 4 and model.vae_factor == 2
    assert not model.untrained
    emb = encode_prompts(model, [PROMPT, "the apple"])  # (B, 77, 32)
    assert emb.shape == (2, 77, 32) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all() and not torch.allclose(emb[0], emb[1])


def test_tree_builds_the_project_benchmark(tree: dict) -> None:
    """oal's OpenOOD path reads the tree: its test set is exactly `test_<id>.txt`, in list order."""
    from oal.config import DataConfig
    from oal.data import build_benchmark

    bench = build_benchmark(DataConfig(benchmark="cifar100", openood_root=str(tree["root"])))
    assert len(bench.class_names) == tree["num_classes"] == 100
    assert bench.class_names[:2] == ["apples", "aquarium fish"]  # the reference's prompt names, not folder names
    assert [str(p.relative_to(tree["images_dir"])) for p, _ in bench.test.items] == tree["test_paths"]
    assert [label for _, label in bench.test.items] == tree["test_labels"]
    assert len(bench.train) == tree["counts"]["train_cifar100"] and len(bench.val) == 100
    assert set(bench.near) == {"cifar10", "tin"} and set(bench.far) == {"mnist", "svhn", "texture", "places365"}
    x, y = bench.test[0]
    assert tuple(x.shape) == (3, 32, 32) and y == tree["test_labels"][0]
    _, y_ood = bench.far["mnist"][0]
    assert y_ood == -1


def test_sd_class_token_position(sd: tuple) -> None:
    """With real BPE the class token is found: 'apple' is one token, 'aquarium fish' spans 11 byte-level pieces."""
    from oal.diffusion import class_token_position

    _, model = sd
    tok, template = model.tokenizer, "A high-quality image of the {}"
    assert class_token_position(model, template, "apple") == 8  # <sot> a high - quality image of the apple
    ids = tok(template.format("aquarium fish"))["input_ids"]
    span = range(8, 19)  # a qu a r i u m</w> f i s h</w>
    assert tok.convert_ids_to_tokens(ids[span.start]) == "a" and tok.convert_ids_to_tokens(ids[span.stop - 1]) == "h</w>"
    assert class_token_position(model, template, "aquarium fish") == span.start  # the first piece, as the reference


def test_outlier_reaches_end_of_text_through_real_clip(sd: tuple) -> None:
    """With the CLIP tokenizer and text model: the input-embedding write at the class's first sub-token changes
    every later position, the end-of-text token included, and none before it."""
    import torch

    from oal.diffusion import class_token_position, encode_prompts, encode_with_outliers, tokenize

    _, model = sd
    prompt = "A high-quality image of the aquarium fish"
    ids = tokenize(model, [prompt])  # (1, 77)
    pos = class_token_position(model, "A high-quality image of the {}", "aquarium fish")
    eot = int((ids[0] == model.tokenizer.eos_token_id).nonzero()[0])
    plain = encode_prompts(model, [prompt])
    new = encode_with_outliers(model, ids, torch.tensor([pos]), torch.randn(1, model.cond_dim))
    changed = (new - plain).abs().amax(-1)[0] > 1e-5  # (77,)
    assert not changed[:pos].any() and changed[pos:].all() and bool(changed[eot])
