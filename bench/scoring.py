"""Batch-scoring throughput of `jobs.score` on Ray Data: 1 vs 2 actors over the same files, in one run.

    . .stack/env && python -m bench.scoring [--images 3000] [--reps 2] [--model DIR] [--device cpu|cuda]

Writes `--images` 28x28 grey PNGs (Fashion-MNIST's size) into a temporary folder and scores them with
`jobs.score.score` from a detector folder (`--model`, e.g. `runs/fashion/detector/model`; default: an untrained
fashion-sized detector, resnet_tiny at 32 px with the KNN score on a 3,000-feature bank, the same work as a
trained one). Each run starts its actor pool (included: a batch job pays it). One untimed warm-up, then
ABBA (1, 2, 2, 1, ...); medians of images/s, and their ratio. On a 2-core machine that other work shares, only
the ratio means much. Needs a running Ray head: `python -m cluster.stack up --services ray && . .stack/env`.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
from pathlib import Path

import numpy as np


def untrained_detector(folder: Path) -> Path:
    import torch

    from oal.detector import Detector, DetectorSpec
    from oal.models import build_student

    torch.manual_seed(0)
    net = build_student("resnet_tiny", 6)
    bank = torch.nn.functional.normalize(torch.randn(3000, net.feature_dim), dim=-1)
    spec = DetectorSpec(arch="resnet_tiny", class_names=[f"c{i}" for i in range(6)], image_size=32, grey=True,
                        mean=[0.5] * 3, std=[0.5] * 3, score="knn", threshold=0.0, id_tpr=0.95, knn_k=50)
    Detector(spec, net, bank).save(folder)
    return folder


def write_images(folder: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8)).save(buf, format="PNG")
        (folder / f"{i:06d}.png").write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    from unittest import mock

    from jobs import common, score

    p = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--reps", type=int, default=2, help="ABBA pairs")
    p.add_argument("--model", help="a detector folder (default: an untrained fashion-sized one)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    common.connect(None)
    with tempfile.TemporaryDirectory(prefix="oal-bench-scoring-") as tmp:
        root = Path(tmp)
        model = Path(args.model) if args.model else untrained_detector(root / "detector")
        write_images(root / "images", args.images)
        spec, weights = (model / "detector.json").read_text(), (model / "weights.pt").read_bytes()
        seen: dict[int, list[float]] = {1: [], 2: []}
        # the detector straight from the folder: what the bench measures is Ray Data's scoring, not a registry
        with mock.patch.object(score, "detector_files", lambda uri: (spec, weights)):
            order = [2] + [a for _ in range(args.reps) for a in (1, 2, 2, 1)]
            for i, actors in enumerate(order):
                s = score.score(str(model), str(root / "images"), str(root / f"out-{i}.parquet"), actors=actors,
                                batch_size=256, use_gpu=args.device == "cuda")
                if i:  # the first run warms the cluster up
                    seen[actors].append(s["images_per_second"])
                print(f"run {i}: {actors} actor(s): {s['images_per_second']:.1f} images/s", flush=True)
    one, two = statistics.median(seen[1]), statistics.median(seen[2])
    print(f"\n| scoring {args.images} images ({args.device}) | 1 actor | 2 actors | ratio |\n|---|---|---|---|\n"
          f"| images/s, median of {len(seen[1])} | {one:.1f} | {two:.1f} | {two / one:.2f}x |")


if __name__ == "__main__":
    main()
