"""Small test data in real on-disk formats, for end-to-end rehearsals with no network.

`make_openood_tree` writes an OpenOOD v1.5 data tree (`benchmark_imglist/<id>/*.txt` plus PNGs under
`images_classic/`); `make_sd_folder` writes a Stable-Diffusion-layout diffusers folder with tiny,
seeded components and a real CLIP byte-level BPE tokenizer built from a handful of merges.

List lines follow OpenOOD v1.5: `<path relative to images_classic/> <label>`, one space, e.g.
`cifar10/test/airplane/0298.png 0`; ID images are numbered per class from 0001. OOD lists carry
label -1 (OpenOOD's evaluator overwrites OOD labels with -1 whatever the list says).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split())
CLASSES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}
TEXTURES = ("banded", "braided", "bubbly", "chequered", "dotted", "striped")
PLACES = ("beach", "canyon", "forest_path", "highway", "mountain", "skyscraper")
TIN_WNIDS = ("n01443537", "n01629819", "n01641577", "n01644900", "n01698640", "n01742172")


# ---- images --------------------------------------------------------------------------------------

def _class_style(benchmark: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean colour (C, 3) and pattern code (C,), fixed by the benchmark name alone."""
    rng = np.random.default_rng(sum(map(ord, benchmark)))
    colours = rng.uniform(30, 225, size=(n_classes, 3))
    patterns = np.arange(n_classes) % 5
    return colours, patterns


def _class_image(rng: np.random.Generator, colour: np.ndarray, pattern: int, size: int) -> np.ndarray:
    """One ID image (size, size, 3) uint8: class colour, class pattern, random phase, pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)  # (H, W)
    phase = rng.uniform(0, 2 * np.pi)
    period = size / 4
    if pattern == 0:
        wave = np.zeros_like(xx)
    elif pattern == 1:
        wave = np.sin(2 * np.pi * yy / period + phase)
    elif pattern == 2:
        wave = np.sin(2 * np.pi * xx / period + phase)
    elif pattern == 3:
        wave = np.sign(np.sin(2 * np.pi * xx / period + phase) * np.sin(2 * np.pi * yy / period))
    else:
        wave = np.sin(2 * np.pi * (xx + yy) / period + phase)
    img = colour[None, None, :] * (1 + 0.35 * wave[..., None])  # (H, W, 3)
    img = img + rng.normal(0, 18, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _ood_image(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One OOD image (size, size, 3) uint8 whose statistics depend on `kind`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)  # (H, W)
    if kind == "mnist":  # white strokes on black, grey replicated to RGB
        im = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 4))):
            pts = [tuple(rng.uniform(size * 0.2, size * 0.8, 2)) for _ in range(3)]
            draw.line(pts, fill=int(rng.integers(200, 256)), width=max(2, size // 10))
        grey = np.asarray(im)
        return np.repeat(grey[..., None], 3, axis=2)
    if kind == "svhn":  # a flat background with a contrasting block "digit"
        bg, fg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = np.broadcast_to(bg, (size, size, 3)).copy()
        x0, y0 = int(rng.integers(size // 4, size // 2)), int(rng.integers(size // 6, size // 3))
        img[y0:size - y0, x0:x0 + size // 5] = fg
        img[y0:y0 + size // 8, x0:size - x0 // 2] = fg
        return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    if kind == "texture":  # high-frequency oriented sinusoid
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.6, 1.2)
        wave = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy))
        img = 128 + 110 * wave[..., None] * rng.uniform(0.5, 1.0, 3)
        return np.clip(img, 0, 255).astype(np.uint8)
    if kind == "places365":  # sky-over-ground vertical gradient
        sky, ground = rng.uniform([80, 120, 180], [160, 200, 255]), rng.uniform([40, 60, 20], [120, 140, 80])
        t = (yy / (size - 1))[..., None]
        img = (1 - t) * sky + t * ground
        return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    if kind == "tin":  # smooth blobs: upsampled coarse noise
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    if kind == "noise":
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    raise ValueError(f"unknown OOD kind {kind!r}")


def _save(images_dir: Path, rel: str, arr: np.ndarray) -> None:
    path = images_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="RGB").save(path, format="PNG")


def _write_list(path: Path, rows: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{rel} {label}\n" for rel, label in rows))


# ---- OpenOOD tree --------------------------------------------------------------------------------

def _ood_rows(stem: str, n: int, size: int, rng: np.random.Generator, images_dir: Path) -> list[tuple[str, int]]:
    """Write `n` images for OOD list `stem` (e.g. `test_mnist`) and return its (path, -1) rows."""
    split, name = stem.split("_", 1)
    rows = []
    for i in range(n):
        if name in CLASSES:  # near-OOD: the other CIFAR, its own palette
            names = CLASSES[name]
            colours, patterns = _class_style(name, len(names))
            c = i % len(names)
            rel = f"{name}/test/{names[c]}/{i // len(names) + 1:04d}.png"
            arr = _class_image(rng, colours[c], int(patterns[c]), size)
        elif name == "tin":
            wnid = TIN_WNIDS[i % len(TIN_WNIDS)]
            rel = f"tin/{split}/{wnid}/{wnid}_{i:04d}.png"
            arr = _ood_image("tin", rng, size)
        elif name == "texture":
            cat = TEXTURES[i % len(TEXTURES)]
            rel = f"texture/{cat}/{cat}_{i + 1:04d}.png"
            arr = _ood_image("texture", rng, size)
        elif name == "places365":
            cat = PLACES[i % len(PLACES)]
            rel = f"places365/{cat}/{i + 1:08d}.png"
            arr = _ood_image("places365", rng, size)
        elif name in ("mnist", "svhn"):
            rel = f"{name}/test/{i:05d}.png"
            arr = _ood_image(name, rng, size)
        else:
            rel = f"{name}/{split}/{i:05d}.png"
            arr = _ood_image("noise", rng, size)
        _save(images_dir, rel, arr)
        rows.append((rel, -1))
    return rows


def make_openood_tree(root: Path, benchmark: str = "cifar100", train_per_class: int = 4, val_per_class: int = 1,
                      test_per_class: int = 1, ood_per_set: int = 6, size: int = 32, seed: int = 0,
                      val_images: int | None = None, test_images: int | None = None) -> dict:
    """Write an OpenOOD v1.5 tree for `benchmark` under `root`; return its lists, counts and test paths.

    ID train images live under `<benchmark>/train/<class>/NNNN.png`; val and test (OpenOOD's val is
    carved out of the CIFAR test split) under `<benchmark>/test/<class>/NNNN.png`, disjoint numbers.
    `val_images` / `test_images` keep only the first rows of those class-interleaved lists (fewer images than
    classes: every image costs a forward pass in each evaluation, and 224 px passes are what a CPU run pays for).
    """
    from oal.data.cifar import OPENOOD_SPLITS

    if benchmark not in CLASSES:
        raise ValueError(f"benchmark must be one of {sorted(CLASSES)}, got {benchmark!r}")
    root = Path(root)
    names = CLASSES[benchmark]
    images_dir = root / "images_classic"
    lists_dir = root / "benchmark_imglist" / benchmark
    rng = np.random.default_rng(seed)
    colours, patterns = _class_style(benchmark, len(names))

    def id_rows(folder: str, per_class: int, start: int, limit: int | None = None) -> list[tuple[str, int]]:
        rows: list[tuple[str, int]] = []
        for k in range(per_class):  # class-interleaved order, as a shuffled list would be
            for c, cname in enumerate(names):
                if limit is not None and len(rows) == limit:
                    return rows
                rel = f"{benchmark}/{folder}/{cname}/{start + k:04d}.png"
                _save(images_dir, rel, _class_image(rng, colours[c], int(patterns[c]), size))
                rows.append((rel, c))
        return rows

    lists: dict[str, list[tuple[str, int]]] = {
        f"train_{benchmark}": id_rows("train", train_per_class, 1),
        f"val_{benchmark}": id_rows("test", val_per_class, 1, val_images),
        f"test_{benchmark}": id_rows("test", test_per_class, 1 + val_per_class, test_images),
    }
    for split in OPENOOD_SPLITS[benchmark]:
        for stem in split.values():
            lists[stem] = _ood_rows(stem, ood_per_set, size, rng, images_dir)
    files = {}
    for stem, rows in lists.items():
        files[stem] = lists_dir / f"{stem}.txt"
        _write_list(files[stem], rows)
    test = lists[f"test_{benchmark}"]
    return {
        "root": root, "images_dir": images_dir, "lists_dir": lists_dir, "benchmark": benchmark,
        "num_classes": len(names), "class_names": list(names), "size": size,
        "lists": files, "counts": {stem: len(rows) for stem, rows in lists.items()},
        "test_paths": [rel for rel, _ in test], "test_labels": [label for _, label in test],
    }


# ---- Stable Diffusion folder ---------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (256 entries)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


# Merges (applied in this order) that make these words single tokens: a, the, of, image, apple, high, quality.
MERGES = (
    ("h", "e</w>"), ("t", "he</w>"), ("o", "f</w>"),
    ("i", "m"), ("a", "g"), ("ag", "e</w>"), ("im", "age</w>"),
    ("a", "p"), ("ap", "p"), ("l", "e</w>"), ("app", "le</w>"),
    ("h", "i"), ("g", "h</w>"), ("hi", "gh</w>"),
    ("q", "u"), ("a", "l"), ("i", "t"), ("it", "y</w>"), ("qu", "al"), ("qual", "ity</w>"),
)


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """Write a tiny CLIP-format `vocab.json` + `merges.txt`; return their paths.

    Vocabulary order as CLIP's: 256 byte symbols, their `</w>` forms, one token per merge, then
    `<|startoftext|>` and `<|endoftext|>` last.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(tokens)) == len(tokens), "duplicate vocabulary entry"
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    # CLIPTokenizer skips the first line of merges.txt (the version header)
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    return vocab_file, merges_file


def make_sd_folder(path: Path, cross_attention_dim: int = 32, seed: int = 0, fp16_weights: bool = True) -> Path:
    """Write a tiny, seeded Stable-Diffusion-layout diffusers folder at `path` and return it.

    Weights are stored in fp16 by default (about 2 MB instead of 4; loaders cast them to their dtype).
    `tokenizer/` holds CLIP's `vocab.json` + `merges.txt` and whatever this transformers'
    `save_pretrained` adds (with transformers 5, `tokenizer.json`).
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = write_clip_vocab(path / "tokenizer")
    tok = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    tok.save_pretrained(path / "tokenizer")

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=cross_attention_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=cross_attention_dim,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    sched = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    for model, sub in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        (model.half() if fp16_weights else model).save_pretrained(path / sub)
    sched.save_pretrained(path / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


# ---- the scale rehearsal: a paper preset at full shape, shrunk only in sizes and epochs -------------------

def teacher_weights(path: Path, image_size: int = 224, seed: int = 0) -> Path:
    """A backbone file for `teacher.pretrained`: a 2-block, 64-wide timm ViT (8 px patches) at
    `image_size`, saved as a plain state dict, as ViT-B/16 weights would be."""
    import timm
    import torch

    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=image_size, patch_size=8, embed_dim=64,
                            depth=2, num_heads=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vit.state_dict(), path)
    return path


REHEARSAL_EVAL_IMAGES = 20  # ID validation and ID test images of the rehearsal's tree (class-interleaved)


def rehearsal(root: Path, preset: str, seed: int = 0) -> list[str]:
    """Write an OpenOOD v1.5 tree, a teacher weights file and a Stable-Diffusion-layout folder under `root`, and
    return the overrides that run `preset` on them: the three paths, then sizes and epochs only (the teacher is
    a smaller timm ViT at the preset's own input size; k-NN, sampling and training shrunk to seconds)."""
    benchmark = "cifar10" if preset.startswith("cifar10_") else "cifar100"
    # 2 training images per class (k-NN's K=1 needs two per class); 20 validation and 20 test images, 2 per OOD list
    per_class = -(-REHEARSAL_EVAL_IMAGES // len(CLASSES[benchmark]))
    tree = make_openood_tree(root / "openood", benchmark, train_per_class=2, val_per_class=per_class,
                             test_per_class=per_class, ood_per_set=2, seed=seed, val_images=REHEARSAL_EVAL_IMAGES,
                             test_images=REHEARSAL_EVAL_IMAGES)
    return [
        f"data.openood_root={tree['root']}",
        f"teacher.pretrained={teacher_weights(root / 'vit_tiny.pth')}",
        f"diffusion.model={make_sd_folder(root / 'sd', seed=seed)}",
        "teacher.network=vit_tiny",  # a 2-block, 64-wide ViT instead of ViT-B/16: same timm code, a smaller size
        "data.num_workers=0",
        "teacher.epochs=1", "base.epochs=1", "student.epochs=1",
        "embeddings.per_class_cap=2", "knn.k=1", "knn.select=2", "knn.pic_nums=2", "knn.rounds=1", "knn.candidates=20",
        "diffusion.resolution=16", "diffusion.steps=2", "diffusion.num_outliers=6", "diffusion.shard_size=3",
        "anchors.projection_steps=20", "diffusion.grid_samples=3",
        "eval.plots=false",
        "cluster.cpus_per_worker=2",  # both cores of a 2-core CI machine for each training stage's one worker
    ]


if __name__ == "__main__":  # python -m tests.realdata ROOT PRESET: writes the data, prints the overrides
    import sys

    print(" ".join(rehearsal(Path(sys.argv[1]), sys.argv[2])))
