"""The main job: every OAL stage in order on Ray, each skipped when its outputs match its inputs.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.pipeline --config digits

base student, CE only (Ray Train) -> teacher (Ray Train) -> built-in diffusion model on the ID images, with
diffusion.model=builtin-ldm (Ray Train) -> embeddings -> anchors -> k-NN outliers (Ray tasks)
-> latent outliers (actor pool) -> OAL student (Ray Train; starts from the base student with
student.init=base) -> evaluation of both (Ray tasks) -> detector (the student, the score chosen on
validation and a threshold; registered in MLflow as models:/oal-<name>@candidate); then results.md (CE baseline,
OAL). The order and how each stage runs: `oal.registry.STAGES`, run here by `RayExecutor`.
Every stage that computes runs in a Ray worker with a training worker's resources (a GPU with
cluster.use_gpu=true); embeddings and evaluation split their data, k-NN its classes, over cluster.shards such
workers (default: one per training worker) and merge in order. The driver only orchestrates and tracks.
Stopping and resubmitting the job redoes only what is missing: finished stages are skipped by
fingerprint, and a training stage resumes from its last Ray Train checkpoint.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from jobs.common import Workers
from oal import config as C
from oal import registry, stages, storage
from oal.tracking import Tracker

log = logging.getLogger("oal.jobs.pipeline")


class RayExecutor:
    """Executor (`oal.registry`) of every stage on Ray: the training stages on Ray Train (`jobs.train.Trainer`,
    streaming their metrics into `stage_run`, the tracker's run of the stage), the latents on the actor pool
    (`jobs.synthesize.Pool`), the others as Ray tasks (`jobs.common.Workers`)."""

    def __init__(self, progress: bool = True, stage_run: Any = None):
        self.progress, self.stage_run = progress, stage_run

    def compute(self, stage: registry.Stage, cfg: C.OALConfig, fp: str, force: bool) -> stages.StageResult:
        from jobs import synthesize as js
        from jobs import train as jt

        executor: Any = Workers()
        if stage.runs == "training":
            sr = self.stage_run
            executor = jt.Trainer(self.progress, sr.run_id if sr else None, sr.metrics if sr else None)
        elif stage.runs == "actors":
            executor = js.Pool(self.progress)
        return executor.compute(stage, cfg, fp, force)


def run_stages(cfg: C.OALConfig, tracker: Tracker, results: dict[str, stages.StageResult],
               todo: list[registry.Stage], progress: bool = True) -> C.OALConfig:
    """`todo` in order on Ray, each in its own MLflow run (its manifest, files and metrics recorded there); returns
    the config with the stages' `inputs` applied."""

    def tracked(stage: registry.Stage, cfg: C.OALConfig) -> stages.StageResult:
        with tracker.stage(stage.name, cfg) as sr:
            res = registry.run(stage, cfg, RayExecutor(progress, sr))
            tracker.record_stage(res, report=res.report, cfg=cfg, live_metrics=stage.runs == "training")
        return res

    return registry.run_all(cfg, todo, results, tracked)


def prepare(cfg: C.OALConfig, tracker: Tracker, results: dict[str, stages.StageResult],
            progress: bool = True) -> C.OALConfig:
    """The stages before the student (`oal.registry.plan`); returns the config with the outlier files filled in."""
    cfg = run_stages(cfg, tracker, results, registry.plan(cfg, last="latents"), progress)
    return stages.with_outlier_files(cfg, results)


def train_and_evaluate(cfg: C.OALConfig, tracker: Tracker, results: dict[str, stages.StageResult],
                       progress: bool = True) -> None:
    """The student and the stages after it; then the results table (CE baseline, OAL) on the pipeline's run."""
    run_stages(cfg, tracker, results, registry.plan(cfg, first="student"), progress)
    tracker.log_comparison(stages.write_comparison(cfg))


def run(cfg: C.OALConfig, progress: bool = True, tracker: Tracker | None = None) -> dict[str, stages.StageResult]:
    tracker = tracker or Tracker.from_env(cfg)
    results: dict[str, stages.StageResult] = {}
    t0 = time.perf_counter()
    stages.check_data(cfg)  # the user's layout, before any work (a listing: the driver fetches no image)
    with tracker.pipeline_run(cfg):
        cfg = run_stages(cfg, tracker, results, registry.plan(cfg), progress)
        tracker.log_comparison(stages.write_comparison(cfg))
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
