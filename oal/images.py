"""Image geometry shared by the datasets and the packaged detector (torch only: the detector imports it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def square(t: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) -> (C, size, size): the shorter side resized to `size` (bilinear, as the embedded benchmarks
    upsample), the longer one centre-cropped."""
    h, w = t.shape[-2:]
    if (h, w) != (size, size):
        nh, nw = (size, max(size, round(w * size / h))) if h <= w else (max(size, round(h * size / w)), size)
        t = F.interpolate(t[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        t = t[:, top:top + size, left:left + size]
    return t
