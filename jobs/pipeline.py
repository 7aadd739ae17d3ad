"""The main job: every OAL stage in order on Ray, each skipped when its outputs match its inputs.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.pipeline --config digits

base student, CE only (Ray Train) -> teacher (Ray Train) -> built-in diffusion model on the ID images, with
diffusion.model=builtin-ldm (Ray Train) -> embeddings -> anchors -> k-NN outliers (Ray tasks)
-> latent outliers (actor pool) -> OAL student (Ray Train; starts from the base student with
model.student_init=base) -> evaluation of both (Ray tasks) -> results.md (CE baseline, OAL) -> detector
(the student, the score chosen on validation and a threshold; registered in MLflow as models:/oal-<name>@candidate).
Every stage that computes runs in a Ray worker with a training worker's resources (a GPU with
cluster.use_gpu=true); embeddings and evaluation split their data, k-NN its classes, over cluster.shards such
workers (default: one per training worker) and merge in order. The driver only orchestrates and tracks.
Stopping and resubmitting the job redoes only what is missing: finished stages are skipped by
fingerprint, and a training stage resumes from its last Ray Train checkpoint.
"""

from __future__ import annotations

import logging
import time

from jobs.common import embeddings_on_workers, evaluate_on_workers, knn_on_workers, on_worker
from oal import config as C
from oal import stages, storage
from oal.tracking import Tracker

log = logging.getLogger("oal.jobs.pipeline")


def prepare(cfg: C.OALConfig, tracker: Tracker, results: dict[str, stages.StageResult],
            progress: bool = True) -> C.OALConfig:
    """Teacher and outlier stages; returns the config with the outlier files filled in."""
    from jobs import synthesize as js
    from jobs import train as jt

    if stages.needs_base(cfg):
        with tracker.stage("base", cfg) as sr:
            results["base"] = jt.run_stage(cfg, "base", progress, mlflow_run_id=sr.run_id, tracking=sr.metrics)
            tracker.record_stage(results["base"], live_metrics=True)
    with tracker.stage("teacher", cfg) as sr:
        results["teacher"] = jt.run_stage(cfg, "teacher", progress, mlflow_run_id=sr.run_id, tracking=sr.metrics)
        tracker.record_stage(results["teacher"], live_metrics=True)
    if stages.needs_diffusion(cfg):
        with tracker.stage("diffusion", cfg) as sr:
            results["diffusion"] = jt.run_stage(cfg, "diffusion", progress, mlflow_run_id=sr.run_id,
                                                tracking=sr.metrics)
            tracker.record_stage(results["diffusion"], live_metrics=True)
    need_knn, need_lat = stages.outlier_stages(cfg)
    if need_knn or need_lat:
        with tracker.stage("embeddings", cfg):
            results["embeddings"] = embeddings_on_workers(cfg)
            tracker.record_stage(results["embeddings"])
        with tracker.stage("anchors", cfg):
            results["anchors"] = on_worker(cfg.cluster, "the anchors stage", stages.run_anchors, cfg)
            tracker.record_stage(results["anchors"])
        with tracker.stage("knn", cfg):
            results["knn"] = knn_on_workers(cfg)  # classes split over the workers
            tracker.record_stage(results["knn"])
    if need_lat:
        with tracker.stage("latents", cfg):
            results["latents"] = js.run_stage(cfg, progress)
            tracker.record_stage(results["latents"])
    return stages.with_outlier_files(cfg, results)


def train_and_evaluate(cfg: C.OALConfig, tracker: Tracker, results: dict[str, stages.StageResult],
                       progress: bool = True) -> None:
    from jobs import train as jt

    with tracker.stage("student", cfg) as sr:
        results["student"] = jt.run_stage(cfg, "student", progress, mlflow_run_id=sr.run_id, tracking=sr.metrics)
        tracker.record_stage(results["student"], live_metrics=True)
    if cfg.eval.baseline:
        with tracker.stage("eval_base", cfg):
            results["eval_base"], report = evaluate_on_workers(cfg, "the base student's evaluation",
                                                               str(stages.base_checkpoint(cfg)), of="base")
            tracker.record_stage(results["eval_base"], report=report, cfg=cfg)
    with tracker.stage("eval", cfg):
        results["eval"], report = evaluate_on_workers(cfg, "the student's evaluation")
        tracker.record_stage(results["eval"], report=report, student=results["student"], cfg=cfg)
    tracker.log_comparison(stages.write_comparison(cfg))
    with tracker.stage("detector", cfg):
        # the evaluated student as a detector (score chosen on validation, threshold, preprocessing), on a worker;
        # tracked: registered in the Model Registry under the alias `candidate`
        results["detector"] = on_worker(cfg.cluster, "the detector stage", stages.run_detector, cfg)
        tracker.record_stage(results["detector"], cfg=cfg)


def run(cfg: C.OALConfig, progress: bool = True, tracker: Tracker | None = None) -> dict[str, stages.StageResult]:
    tracker = tracker or Tracker.from_env(cfg)
    results: dict[str, stages.StageResult] = {}
    t0 = time.perf_counter()
    stages.check_data(cfg)  # the user's layout, before any work (a listing: the driver fetches no image)
    with tracker.pipeline_run(cfg):
        cfg = prepare(cfg, tracker, results, progress)
        train_and_evaluate(cfg, tracker, results, progress)
    log.info("pipeline finished in %.1f s: %s", time.perf_counter() - t0,
             ", ".join(f"{k}={'skipped' if r.skipped else 'done'}" for k, r in results.items()))
    return results


def main(argv: list[str] | None = None) -> int:
    from jobs import common

    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = common.load(args)
    common.connect(args.address)
    with common.data_errors("jobs.pipeline"):
        results = run(cfg, progress=not args.no_progress)
    for r in results.values():
        print(f"[{r.name}] {'skipped (up to date)' if r.skipped else 'done'}: {r.outputs}")
    print(storage.pull(results["eval"].outputs["table"]).read_text())
    print((cfg.run_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
