"""The OOD detector a team deploys: preprocessing, the trained network, the OOD score chosen on validation (with
what it needs, e.g. KNN's normalised training-feature bank), a threshold at a target ID acceptance rate, and the
class names. Saved as `detector.json` plus `weights.pt` (tensors only: it loads with `weights_only=True`).

    det = Detector.load("runs/fashion/detector/model")
    det.predict([png_bytes, uint8_array, ...])  # -> label, class_name, confidence, ood_score, is_ood, error

Any image size, grey or colour, uint8 arrays or encoded PNG/JPEG bytes go in; the benchmark's own resize and
normalisation happen inside, as in evaluation.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oal.evaluate import KNNScore, Outputs, energy_score, max_logit_score, msp_score
from oal.images import square
from oal.models import Classifier, build_student

SPEC = "detector.json"
WEIGHTS = "weights.pt"
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601: colour -> grey, for a network trained on grey images
SCORES = ("msp", "ebo", "mls", "knn")


class ImageError(ValueError):
    """An input that is not an image the detector can read (named by its position in the batch)."""


@dataclass
class DetectorSpec:
    arch: str  # the student's architecture (oal.models)
    class_names: list[str]
    image_size: int  # the network's input side, px
    grey: bool  # trained on grey images (replicated to 3 channels): colour inputs are turned grey first
    mean: list[float]  # per-channel normalisation of inputs in [0, 1]
    std: list[float]
    score: str  # the OOD score, chosen on validation: msp | ebo | mls | knn
    threshold: float  # ood_score above it is flagged OOD
    id_tpr: float  # the share of ID validation images the threshold accepts
    knn_k: int | None = None
    ebo_temperature: float = 1.0


class Detector:
    def __init__(self, spec: DetectorSpec, net: Classifier, bank: torch.Tensor | None = None, device: str = "cpu"):
        if spec.score not in SCORES:
            raise ValueError(f"detector score '{spec.score}' is not one of {', '.join(SCORES)}")
        if spec.score == "knn" and (bank is None or spec.knn_k is None):
            raise ValueError("a KNN detector needs its training-feature bank and K")
        self.spec, self.net, self.bank, self.device = spec, net.to(device).eval(), bank, torch.device(device)
        self._knn = KNNScore(bank, spec.knn_k) if spec.score == "knn" else None  # type: ignore[arg-type]

    # ---- files ----------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> list[Path]:
        from oal.storage import save_torch, write_json

        folder = Path(folder)
        save_torch({"net": self.net.state_dict(), **({"bank": self.bank} if self.bank is not None else {})},
                   folder / WEIGHTS)
        write_json(asdict(self.spec), folder / SPEC)  # last: a folder with a spec is whole
        return [folder / WEIGHTS, folder / SPEC]

    @classmethod
    def from_bytes(cls, spec: str, weights: bytes, device: str = "cpu") -> Detector:
        """From a spec's JSON text and the weights file's bytes (as a batch job hands them to its actors)."""
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        return cls._build(DetectorSpec(**json.loads(spec)), state, device)

    @classmethod
    def _build(cls, spec: DetectorSpec, state: dict[str, Any], device: str = "cpu") -> Detector:
        net = build_student(spec.arch, len(spec.class_names))
        net.load_state_dict(state["net"])
        return cls(spec, net, state.get("bank"), device)

    @classmethod
    def load(cls, folder: str | Path) -> Detector:
        from oal.storage import load_torch, pull

        folder = Path(folder)
        path = pull(folder / SPEC)
        if not path.is_file():
            raise FileNotFoundError(f"'{folder}' holds no detector ({SPEC} missing): run the detector stage")
        spec = DetectorSpec(**json.loads(path.read_text()))
        return cls._build(spec, load_torch(folder / WEIGHTS, "detector weights"))

    # ---- inference ------------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Images (encoded bytes, or arrays H x W, H x W x C with C in 1, 3, 4; uint8, or floats in [0, 1]) ->
        the network's input (N, 3, S, S), resized and normalised as the benchmark's images were."""
        return torch.stack([self._one(img, i) for i, img in enumerate(images)]) if len(images) else \
            torch.zeros(0, 3, self.spec.image_size, self.spec.image_size)

    def _one(self, image: Any, index: int) -> torch.Tensor:
        x = _to_array(image, index)  # (H, W, C) float32 in [0, 1], C = 1 or 3
        t = torch.from_numpy(x).permute(2, 0, 1)  # (C, H, W)
        if self.spec.grey and t.shape[0] == 3:
            t = (t * torch.tensor(LUMA).view(3, 1, 1)).sum(0, keepdim=True)  # (1, H, W)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        # the resize the benchmarks apply to their images: bilinear (oal.data.grey_images), the shorter side to the
        # model's size and the longer centre-cropped (oal.data.files.square; a square image is only resized)
        t = square(t, self.spec.image_size)
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (self.spec.mean, self.spec.std))
        return ((t - mean) / std).contiguous()

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, K), confidence in the chosen score (N,): higher = more ID) of preprocessed inputs."""
        logits, feats = self.net(x.to(self.device))
        logits, feats = logits.float().cpu(), feats.float().cpu()
        return logits, confidence(self.spec, Outputs(logits, feats, torch.zeros(len(x))), self._knn)

    def predict(self, images: Sequence[Any], batch_size: int = 256) -> dict[str, list]:
        """One answer per image: label, class_name, confidence (the softmax probability of the label), ood_score
        (the chosen score, negated: higher = more OOD), is_ood (ood_score > threshold) and error (None, or why
        the image could not be read: that row's other fields are empty)."""
        out: dict[str, list] = {k: [] for k in ("label", "class_name", "confidence", "ood_score", "is_ood", "error")}
        for start in range(0, len(images), batch_size):
            batch = list(images[start:start + batch_size])
            xs: list[torch.Tensor] = []
            ok: list[str | None] = []
            for i, img in enumerate(batch):
                try:
                    xs.append(self._one(img, start + i))
                    ok.append(None)
                except ImageError as e:
                    ok.append(str(e))
            if xs:
                logits, conf = self.scores(torch.stack(xs))
                probs = torch.softmax(logits.float(), -1)
                p, label = probs.max(-1)
            j = 0
            for err in ok:
                if err is not None:  # a row of its own: the error, nothing else
                    for k in out:
                        out[k].append(err if k == "error" else None)
                    continue
                score = -float(conf[j])
                out["label"].append(int(label[j]))
                out["class_name"].append(self.spec.class_names[int(label[j])])
                out["confidence"].append(float(p[j]))
                out["ood_score"].append(score)
                out["is_ood"].append(bool(score > self.spec.threshold))
                out["error"].append(None)
                j += 1
        return out


def confidence(spec: DetectorSpec, o: Outputs, knn: KNNScore | None = None) -> torch.Tensor:
    """The chosen score of network outputs (N,), higher = more ID, as the evaluation computes it."""
    if spec.score == "msp":
        return msp_score(o.logits)
    if spec.score == "ebo":
        return energy_score(o.logits, spec.ebo_temperature)
    if spec.score == "mls":
        return max_logit_score(o.logits)
    assert knn is not None
    return knn(o.features)


def threshold_at(id_conf: np.ndarray, id_tpr: float) -> float:
    """The OOD-score threshold that accepts `id_tpr` of the ID images whose confidences are `id_conf`: their
    ood_score (-confidence) is at most it for that share (the (id_tpr)-quantile of the ID ood_scores)."""
    return float(np.quantile(-np.asarray(id_conf, dtype=np.float64), id_tpr))


def _to_array(image: Any, index: int) -> np.ndarray:
    """(H, W, C) float32 in [0, 1], C = 1 or 3, from encoded bytes or an array; ImageError naming the input."""
    if isinstance(image, str):  # base64, as JSON carries bytes
        import base64
        import binascii

        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"image {index}: a string that is not base64-encoded image bytes") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(bytes(image))) as im:
                im.load()
                arr = np.asarray(im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageError(f"image {index}: {len(image)} bytes that are not a PNG or JPEG image we can read "
                             f"({type(e).__name__})") from None
        image = arr
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise ImageError(f"image {index}: shape {tuple(arr.shape)}; expected H x W, or H x W x C with C = 1, 3 or 4")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]  # alpha dropped
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
        return arr.astype(np.float32)
    raise ImageError(f"image {index}: dtype {arr.dtype} with values in [{arr.min()}, {arr.max()}]; expected uint8, or "
                     f"floats in [0, 1]")
