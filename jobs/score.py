"""Batch scoring on Ray Data: a registered detector over a folder or a bucket prefix, one row per image file.

    python -m jobs.score --model models:/oal-fashion@candidate --input s3://bucket/photos/ \
        --output s3://bucket/scores/photos.parquet [--actors 2] [--batch-size 256] [--use-gpu]

The driver resolves the model once (MLflow) and lists the files; Ray Data spreads the paths over a pool of
`--actors` actors (one GPU each with --use-gpu), each of which reads its files (from the bucket, or a local
folder on a one-node cluster) and runs the detector. A file that cannot be read or decoded becomes a row with its
error, never a failed job. The rows, sorted by path, are written as one parquet file (write, then rename/upload);
with MLflow configured, the run records the counts, the flagged share and the throughput.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from oal import storage

log = logging.getLogger("oal.jobs.score")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
COLUMNS = ("path", "label", "class_name", "confidence", "ood_score", "is_ood", "error")


def list_images(source: str) -> tuple[list[str], int]:
    """The image files under a local folder or an s3:// prefix (by suffix, sorted), and how many other files."""
    if storage.is_uri(source):
        bucket, _, prefix = source.partition("://")[2].partition("/")
        keys: list[str] = []
        for page in storage.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        files = [f"s3://{bucket}/{k}" for k in keys]
    else:
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(f"--input '{source}' is not a folder (or an s3:// prefix)")
        files = [str(p) for p in root.rglob("*") if p.is_file()]
    images = sorted(f for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    return images, len(files) - len(images)


def read_bytes(path: str) -> bytes:
    if storage.is_uri(path):
        bucket, _, key = path.partition("://")[2].partition("/")
        return storage.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(path).read_bytes()


def detector_files(model_uri: str) -> tuple[str, bytes]:
    """The registered detector's spec (JSON text) and weights (bytes), fetched once by the driver."""
    import mlflow

    from oal.detector import SPEC, WEIGHTS

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri.rstrip("/")))
    found = [p for p in local.rglob(SPEC)]
    if not found:
        raise FileNotFoundError(f"model '{model_uri}' holds no detector ({SPEC}): is it an OAL detector?")
    folder = found[0].parent
    return (folder / SPEC).read_text(), (folder / WEIGHTS).read_bytes()


class Scorer:
    """One Ray Data actor: the detector built once, then a batch of paths at a time."""

    def __init__(self, spec: str, weights: bytes, device: str = "cpu"):
        from oal.detector import Detector

        self.detector = Detector.from_bytes(spec, weights, device)

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        images: list[Any] = []
        read_errors: list[str | None] = []
        for path in batch["path"]:
            try:
                images.append(read_bytes(path))
                read_errors.append(None)
            except Exception as e:  # a missing object, a permission: that file's row says so
                images.append(None)
                read_errors.append(f"cannot read '{path}': {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        ok = [i for i, img in enumerate(images) if img is not None]
        answers = self.detector.predict([images[i] for i in ok])
        rows: dict[str, list] = {k: [None] * len(images) for k in COLUMNS}
        rows["path"] = list(batch["path"])
        for j, i in enumerate(ok):
            for k in COLUMNS[1:]:
                rows[k][i] = answers[k][j]
        for i, err in enumerate(read_errors):
            if err is not None:
                rows["error"][i] = err
        return pd.DataFrame(rows)


def score(model_uri: str, source: str, output: str, actors: int = 2, batch_size: int = 256, use_gpu: bool = False,
          cpus_per_actor: float = 1.0) -> dict[str, Any]:
    """Score every image under `source` with the detector `model_uri` on Ray Data; write `output` (parquet)."""
    import ray

    paths, others = list_images(source)
    if not paths:
        raise FileNotFoundError(f"--input '{source}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    spec, weights = detector_files(model_uri)
    log.info("scoring %d images under %s with %s on %d actor(s)%s", len(paths), source, model_uri, actors,
             f" ({others} other files left out)" if others else "")
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(actors * 4, 1))
    scored = ds.map_batches(Scorer, fn_constructor_kwargs={"spec": spec, "weights": weights,
                                                           "device": "cuda" if use_gpu else "cpu"},
                            batch_size=batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0)
    table = scored.to_pandas().sort_values("path", kind="stable").reset_index(drop=True)
    seconds = time.perf_counter() - t0
    write_parquet(table, output)
    errors = int(table["error"].notna().sum())
    scored_ok = table[table["error"].isna()]
    summary = {"images": len(table), "errors": errors, "flagged": int(scored_ok["is_ood"].astype(bool).sum()),
               "flagged_fraction": float(scored_ok["is_ood"].astype(bool).mean()) if len(scored_ok) else 0.0,
               "seconds": seconds, "images_per_second": len(table) / seconds, "other_files": others}
    log.info("scored %d images in %.1f s (%.1f images/s): %d flagged OOD (%.1f%%), %d unreadable; %s",
             len(table), seconds, summary["images_per_second"], summary["flagged"],
             100 * summary["flagged_fraction"], errors, output)
    return summary


def write_parquet(table: Any, output: str) -> None:
    """One parquet file, whole or absent: written beside the target and renamed (uploaded under s3://)."""
    with storage.atomic_path(storage.local(output)) as tmp:
        table.to_parquet(tmp, index=False)


def track(model_uri: str, source: str, output: str, actors: int, summary: dict[str, Any]) -> str | None:
    """An MLflow run for the scoring job (when MLFLOW_TRACKING_URI is set): what, where, counts, throughput."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    import mlflow

    mlflow.set_experiment(os.environ.get("OAL_SCORE_EXPERIMENT", "oal-score"))
    with mlflow.start_run(run_name="score", tags={"oal.kind": "score", "oal.model": model_uri,
                                                  "oal.input": source, "oal.output": output}) as run:
        mlflow.log_params({"model": model_uri, "input": source, "output": output, "actors": actors})
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    from jobs import common

    p = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/detector")
    p.add_argument("--input", required=True, help="a folder, or s3://bucket/prefix")
    p.add_argument("--output", required=True, help="the parquet file to write: a path or s3://bucket/key.parquet")
    p.add_argument("--actors", type=int, default=2, help="Ray Data actors that score (default 2)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch handed to an actor")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--address", default=None, help="Ray address (default: the job's cluster, or RAY_ADDRESS)")
    args = p.parse_args(argv)
    if args.actors < 1 or args.batch_size < 1 or args.cpus_per_actor <= 0:
        print("jobs.score: error: --actors and --batch-size must be >= 1, --cpus-per-actor > 0", file=sys.stderr)
        return 2
    if not args.output.endswith(".parquet"):
        print(f"jobs.score: error: --output '{args.output}' must name a .parquet file", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    common.connect(args.address)
    try:
        summary = score(args.model, args.input, args.output, args.actors, args.batch_size, args.use_gpu,
                        args.cpus_per_actor)
    except (FileNotFoundError, ValueError) as e:
        print(f"jobs.score: error: {e}", file=sys.stderr)
        return 2
    run_id = track(args.model, args.input, args.output, args.actors, summary)
    print(f"[score] {summary['images']} images, {summary['flagged']} flagged OOD, {summary['errors']} unreadable, "
          f"{summary['images_per_second']:.1f} images/s -> {args.output}" + (f" (MLflow run {run_id})" if run_id else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
