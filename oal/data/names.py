"""Class names as they go into the diffusion prompt ("A high-quality image of the {name}").

CIFAR-100: the reference's cleaned names (its outlier-generation script), not torchvision's folder names
("aquarium fish", not "aquarium_fish"; "apples", not "apple"). Index = label, as in OpenOOD's lists.
ImageNet-200: the first WordNet lemma of each synset, from the table that ships with timm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR100_NAMES = (
    "apples", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottles", "bowls", "boy",
    "bridge", "bus", "butterfly", "camel", "cans", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cups", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "computer keyboard", "lamp", "lawn-mower", "leopard",
    "lion", "lizard", "lobster", "man", "maple", "motorcycle", "mountain", "mouse", "mushrooms", "oak", "oranges",
    "orchids", "otter", "palm", "pears", "pickup truck", "pine", "plain", "plates", "poppies", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "roses", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflowers", "sweet peppers", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulips", "turtle", "wardrobe", "whale", "willow", "wolf",
    "woman", "worm",
)


def wordnet_name(wnid: str) -> str:
    """'n01443537' -> 'goldfish' (the first lemma of timm's synset description)."""
    from timm.data import ImageNetInfo

    try:
        description = ImageNetInfo().label_name_to_description(wnid)
    except (KeyError, ValueError):
        raise ValueError(f"'{wnid}' is not an ImageNet-1k WordNet id (expected e.g. n01443537)") from None
    return str(description).split(",")[0].strip()


def imagenet_class_names(train: Any) -> list[str]:
    """Names of ImageNet-200's labels, from the synset folder of each label's images in the training list
    (`imagenet_1k/train/n01443537/....JPEG 0`)."""
    wnids: dict[int, str] = {}
    for path, label in train.items:
        wnids.setdefault(label, Path(path).parent.name)
    return [wordnet_name(wnids[i]) for i in sorted(wnids)]
