"""Image files on disk as datasets: the reader shared by OpenOOD's image lists and user folders and lists."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from oal.data import DataError
from oal.images import square

log = logging.getLogger("oal.data")


def reason(e: BaseException) -> str:
    """One line: the exception's type and message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def list_lines(text: str, where: str) -> Iterator[tuple[int, str, int]]:
    """(line number, path, label) of each `relative/path label` line of an image list's text (read from `where`);
    blank lines skipped, any other line a DataError naming `where` and the line."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(" ", 1)
        if len(parts) != 2 or not parts[0].strip() or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{where}:{n}: expected '<path> <label>', got {line!r}")
        yield n, parts[0], int(parts[1])


class ImageFiles(Dataset):
    """Images read with PIL, one (path, label) per item, `where[i]` saying where item i was named (a list's line,
    a folder) for error messages.

    An image that cannot be read (missing, not an image, truncated) is, with `on_bad_image="error"`, a DataError
    naming the file, raised when it is read, or at once with `check=True`. With "skip", every file's header is
    read once here and the unreadable ones are left out, their count logged; a file whose header reads but whose
    pixels do not is replaced by the next readable one when it is read (logged)."""

    def __init__(self, items: list[tuple[Path, int]], where: list[str], transform: Callable, on_bad_image: str,
                 source: str, check: bool = False):
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image is {on_bad_image!r}; expected error or skip (data.on_bad_image)")
        self.items, self.where, self.transform = items, where, transform
        self.on_bad_image, self.source = on_bad_image, source
        self.skipped = 0  # items left out (skip mode)
        if on_bad_image == "skip" or check:
            self._drop_unreadable()

    def _drop_unreadable(self) -> None:
        keep, bad = [], []
        for j, (path, _) in enumerate(self.items):
            try:
                with Image.open(path):
                    pass
            except Exception as e:  # any reason PIL cannot identify the file
                bad.append((j, e))
            else:
                keep.append(j)
        if not bad:
            return
        j, why = bad[0]
        if self.on_bad_image == "error":
            raise DataError(f"image '{self.items[j][0]}' ({self.where[j]}) cannot be read: {reason(why)}"
                            f"{f' (and {len(bad) - 1} more of {self.source})' if len(bad) > 1 else ''}; replace or "
                            f"remove it, or set data.on_bad_image=skip")
        log.warning("data.on_bad_image=skip: left out %d of %d images listed in %s (unreadable; the first: %s: %s)",
                    len(bad), len(self.items), self.source, self.items[j][0], reason(why))
        self.items = [self.items[j] for j in keep]
        self.where = [self.where[j] for j in keep]
        self.skipped = len(bad)

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, i: int) -> Image.Image:
        path, _ = self.items[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except Exception as e:  # missing, not an image, truncated: all one message
            raise DataError(f"image '{path}' ({self.where[i]}) cannot be read: "
                            f"{reason(e)}; replace or remove it, or set data.on_bad_image=skip") from None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for j in range(i, i + len(self.items)) if self.on_bad_image == "skip" else (i,):
            j %= len(self.items)
            try:
                img = self._read(j)
            except DataError as e:
                if self.on_bad_image == "error":
                    raise
                self.skipped += 1
                log.warning("data.on_bad_image=skip: %s; using the next image of the list instead (%d so far)",
                            str(e).split("; replace")[0], self.skipped)
                continue
            return self.transform(img), self.items[i][1]
        raise DataError(f"no image of {self.source} can be read (data.on_bad_image=skip)")


def pixels(img: Image.Image) -> torch.Tensor:
    """An RGB image -> (3, h, w) float in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


class Pixels:
    """PIL image -> the model's input: RGB (grey replicated), `size` x `size`, normalised by per-channel `mean`
    and `std` (one value each, or three)."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return ((square(pixels(img), self.size) - self.mean) / self.std).contiguous()
