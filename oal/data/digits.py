"""The embedded default benchmark, built only from data that ships inside scikit-learn.

ID: handwritten digits 0-5 (sklearn's 8x8 digits set), stratified 60/10/30 train/val/test.
Validation OOD: digit 9 (used for tuning; never a test set).
Near-OOD test: digits 6, 7, 8 (same pixel statistics, unseen classes).
Far-OOD test: 8x8 patches cut from sklearn's two sample photographs, and uniform noise images.
Images are scaled to [0, 1], upsampled to `image_size`, replicated to 3 channels and normalised.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from oal.config import DataConfig
from oal.data import Arrays, photo_patches, register_arrays

ID_CLASSES = (0, 1, 2, 3, 4, 5)
NEAR_CLASSES = (6, 7, 8)
VAL_OOD_CLASSES = (9,)
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@register_arrays("digits")
def arrays(cfg: DataConfig) -> Arrays:
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    y = d.target
    id_mask = np.isin(y, ID_CLASSES)
    xi, yi = x[id_mask], y[id_mask]
    x_tr, x_rest, y_tr, y_rest = train_test_split(xi, yi, test_size=0.4, stratify=yi, random_state=cfg.split_seed)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.75, stratify=y_rest,
                                              random_state=cfg.split_seed)
    rng = np.random.default_rng(cfg.split_seed + 1)
    return Arrays(
        name="digits",
        class_names=[NAMES[c] for c in ID_CLASSES],
        train=(x_tr, y_tr), val=(x_va, y_va), test=(x_te, y_te),
        ood_val={"digit9": x[np.isin(y, VAL_OOD_CLASSES)]},
        near={"digits678": x[np.isin(y, NEAR_CLASSES)]},
        far={"photo_patches": photo_patches(400, 8, cfg.split_seed + 2),
             "noise": rng.random((300, 8, 8), dtype=np.float32)},
    )
