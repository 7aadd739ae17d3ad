"""Teacher fine-tune, base (CE) student and OAL student training on Ray Train (v2), with Accelerate inside
each worker.

Each worker runs `oal.stages.train_stage` (the same loop as `oal student`) into a worker-local folder.
Every epoch, all ranks call `ray.train.report` (a barrier) and rank 0 attaches the checkpoint; a worker
that dies restarts the group (`cluster.max_failures`), and each rank resumes from the last reported
checkpoint. When the run ends, the driver copies the final checkpoint into the stage folder and
writes the stage manifest, exactly as the single-process command does.

    python -m jobs.train --config digits --stage teacher cluster.num_workers=2
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oal import config as C
from oal import pretrained, stages, storage
from oal.storage import load_torch, save_torch
from oal.train import CHECKPOINT

if TYPE_CHECKING:
    from oal.tracking import MetricLogger

log = logging.getLogger("oal.jobs.train")


def quiet_ray_train_reports() -> None:
    """Ray Train logs two INFO lines per reported checkpoint in the worker ("Checkpoint successfully created at",
    "Reporting training result"): with a report per epoch they outnumber our own per-epoch lines in a job log.
    Their loggers go to WARNING in this process; the epoch line of each stage says the same in one line."""
    import importlib

    for name in ("ray.train.v2._internal.execution.storage", "ray.train.v2._internal.execution.context",
                 "ray.train._internal.storage"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # another Ray version: its chatter stays, nothing breaks
            continue
        getattr(module, "logger", logging.getLogger(name)).setLevel(logging.WARNING)


NODE_LOSS_WAIT_S = 30.0  # after a failed training run placed on labelled nodes: how long to wait to see them gone
FAILED_WRITES = "tracking_failed_writes"  # reported by every epoch of a worker: its MLflow writes that failed


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    from oal.train import make_accelerator

    quiet_ray_train_reports()

    from jobs.common import in_worker

    in_worker(config["object_cache"])
    cfg = C.from_dict(config["cfg"])
    stage = config["stage"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    work = Path(tempfile.mkdtemp(prefix=f"oal-{stage}-rank{rank}-"))
    restored = ray.train.get_checkpoint()
    if restored is not None:
        # Resume: every rank starts from the same reported checkpoint (fit checks its fingerprint).
        with restored.as_directory() as d:
            shutil.copyfile(Path(d) / CHECKPOINT, work / CHECKPOINT)
        if rank == 0:
            log.warning("%s: resuming from the reported checkpoint %s", stage, restored.path)
    train_cfg = stages.training_config(cfg, stage)
    if ctx.get_world_size() == 1:
        # One worker: Ray sets LOCAL_RANK, which makes Accelerate wrap the model in DDP over a group of one
        # (an all-reduce and bucket copies per step for nothing). Without it the loop runs as `oal student` does.
        os.environ.pop("LOCAL_RANK", None)
    acc = make_accelerator(cfg.device if not config["use_gpu"] else "cuda", train_cfg)

    from oal.tracking import MetricLogger

    # Only rank 0 logs to MLflow (straight into the stage's child run, while training runs).
    mlflow_run = config.get("mlflow_run_id") if rank == 0 else None
    if mlflow_run:
        os.environ["MLFLOW_TRACKING_URI"] = config["mlflow_uri"]
    metrics_log = MetricLogger(mlflow_run, stages.stage_dir(cfg, stage) / "tracking_buffer.jsonl",
                               config["mlflow_uri"] if mlflow_run else None)

    reports = 0

    def report(epoch: int, metrics: dict[str, float], ckpt: Path) -> None:
        from ray.train import Checkpoint

        nonlocal reports
        reports += 1
        metrics_log.log({k.replace("/", "_"): v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        # this worker's failed MLflow writes so far: the driver adds rank 0's to its own count (run_stage)
        payload = with_objective({**metrics, "epoch": epoch, FAILED_WRITES: metrics_log.failed},
                                 config.get("objective"))
        if rank == 0 and ckpt.exists():
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(ckpt, Path(tmp) / CHECKPOINT)
                ray.train.report(payload, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(payload)

    fitted = stages.train_stage(cfg, stage, config["fp"], out_dir=work, on_epoch_end=report, accelerator=acc,
                                progress=config["progress"] and rank == 0)
    if restored is not None and not reports and fitted.history:
        # Restored at its last epoch (the run was cut after that epoch's checkpoint was reported, before its end
        # was recorded): nothing was left to train. The checkpoint says that this run resumed there, and that epoch
        # is reported once more, so that the run's result and whoever follows its reports (a Tune trial, which
        # may have received only an earlier epoch) end on it.
        if rank == 0:
            state = load_torch(work / CHECKPOINT, "checkpoint")
            save_torch({**state, "resumed_from_epoch": fitted.resumed_from_epoch}, work / CHECKPOINT)
        last = fitted.history[-1]
        report(int(last.get("epoch", len(fitted.history))), last, work / CHECKPOINT)
    shutil.rmtree(work, ignore_errors=True)


def with_objective(metrics: dict[str, float], objective: dict | None) -> dict[str, float]:
    """Tuning: adds the searched metric as "objective", pushed below every valid trial when the ID accuracy
    drops too far (objective: {"metric": ..., "min_id_acc": ... or None}). Unchanged when not tuning."""
    if not objective:
        return metrics
    ok = objective["min_id_acc"] is None or metrics.get("val/id_accuracy", 0.0) >= objective["min_id_acc"]
    return {**metrics, "objective": metrics.get(objective["metric"], 0.0) - (0.0 if ok else 1.0)}


def make_trainer(cfg: C.OALConfig, stage: str, fp: str, progress: bool = True, mlflow_run_id: str | None = None,
                 callbacks: list | None = None, objective: dict | None = None, run_name: str | None = None) -> Any:
    """The Ray Train run of `stage`, whose fingerprint is `fp` (`oal.registry.fingerprint`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.common import placement

    k = cfg.cluster
    return TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": C.to_dict(cfg), "stage": stage, "fp": fp, "use_gpu": k.use_gpu, "progress": progress,
                           "mlflow_run_id": mlflow_run_id, "objective": objective,
                           "mlflow_uri": cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"),
                           "object_cache": str(storage.cache_root())},  # the workers read the driver's mirror paths
        scaling_config=ScalingConfig(num_workers=k.num_workers, use_gpu=k.use_gpu,
                                     resources_per_worker={"CPU": k.cpus_per_worker, **({"GPU": 1} if k.use_gpu else {})},
                                     **placement(k)),
        # A stable name per (run, stage, inputs): a resubmitted job resumes the same Ray Train run.
        run_config=RunConfig(name=run_name or f"{cfg.name}-{stage}-{fp}", storage_path=cfg.ray_storage, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=k.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=k.checkpoints_to_keep)),
    )


def check_resources(cfg: C.ClusterConfig) -> None:
    from jobs.common import require_resources

    per = {"CPU": cfg.cpus_per_worker, "GPU": 1.0 if cfg.use_gpu else 0.0}
    require_resources({k: v * cfg.num_workers for k, v in per.items()},
                      f"{cfg.num_workers} training worker(s) of {cfg.cpus_per_worker:g} CPU"
                      + (" and 1 GPU" if cfg.use_gpu else ""), cfg)


def run_stage(cfg: C.OALConfig, stage: str, progress: bool = True, force: bool = False,
              mlflow_run_id: str | None = None, tracking: MetricLogger | None = None,
              **trainer_options: Any) -> stages.StageResult:
    """Train `stage` (teacher | base | student | diffusion) on Ray Train unless its outputs are up to date
    (`oal.registry.run`). The rest as `Trainer`'s."""
    from oal import registry

    return registry.run(registry.named(stage), cfg, Trainer(progress, mlflow_run_id, tracking, **trainer_options),
                        force)


class Trainer:
    """Executor (`oal.registry`) of the training stages on Ray Train. `tracking`: the stage run's logger in this
    process, which takes over the count of the MLflow writes that failed in rank 0 (the worker that logs; counted
    since its last start). `trainer_options`: `make_trainer`'s callbacks, objective and run_name (tuning)."""

    def __init__(self, progress: bool = True, mlflow_run_id: str | None = None, tracking: MetricLogger | None = None,
                 **trainer_options: Any):
        self.progress, self.mlflow_run_id, self.tracking, self.options = progress, mlflow_run_id, tracking, trainer_options

    def compute(self, st: Any, cfg: C.OALConfig, fp: str, force: bool) -> stages.StageResult:
        stage, trainer_options = st.name, dict(self.options)
        stages.check_inputs(cfg, stage)
        check_resources(cfg.cluster)
        from jobs.common import on_worker

        if stage == "diffusion" and pretrained.usable(cfg) is not None:
            # A pretrained model that fits: measured on a worker, no training group (None: it did not fit there)
            adopted = on_worker(cfg.cluster, "the diffusion stage (pretrained model)",
                                stages.adopt_pretrained_diffusion, cfg, fp, force)
            if adopted is not None:
                return adopted
        if force and trainer_options.get("run_name") is None:
            # A run of its own: under the stable name Ray Train would restore the last run's checkpoint and retrain
            # nothing.
            import time

            trainer_options["run_name"] = f"{cfg.name}-{stage}-{fp}-redo-{time.strftime('%Y%m%d-%H%M%S')}"
        result = fit_placed(cfg, stage, fp, self.progress, self.mlflow_run_id, **trainer_options)
        failed = int((result.metrics or {}).get(FAILED_WRITES, 0))
        if failed:
            log.warning("%s: %d metric writes to MLflow failed in the training worker (buffered in its "
                        "tracking_buffer.jsonl)", stage, failed)
            if self.tracking is not None:
                self.tracking.failed += failed
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train run for stage {stage} ended without a checkpoint (error: {result.error})")
        # On a worker: the diffusion stage measures its model there (sampling, the teacher as judge, a decoded grid).
        return on_worker(cfg.cluster, f"recording the {stage} stage", finish_from_checkpoint, cfg, stage, fp,
                         result.checkpoint)


def fit_placed(cfg: C.OALConfig, stage: str, fp: str, progress: bool, mlflow_run_id: str | None,
               **trainer_options: Any) -> Any:
    """The Ray Train run of `stage` on the nodes cluster.label_selector names. When it fails and no alive node
    carries those labels any more (its nodes were lost), it goes on on any node (`jobs.common.selector_now`), from
    its last checkpoint (the same run name, so Ray Train restores the run's checkpoint from its storage), instead of
    waiting for a node to join."""
    from jobs.common import labels_lost, selector_now

    try:
        return make_trainer(cfg, stage, fp, progress, mlflow_run_id, **trainer_options).fit()
    except Exception as e:
        if not labels_lost(selector_now(cfg.cluster), stage, "it goes on on any node, from its last checkpoint "
                           f"(training failed: {str(e).splitlines()[0][:200]})", wait_s=NODE_LOSS_WAIT_S):
            raise
    return make_trainer(cfg, stage, fp, progress, mlflow_run_id, **trainer_options).fit()


def finish_from_checkpoint(cfg: C.OALConfig, stage: str, fp: str, checkpoint: Any) -> stages.StageResult:
    """Record a stage from its last Ray Train checkpoint (local or in `cluster.storage_path`)."""
    with checkpoint.as_directory() as ckdir:
        # The checkpoint carries every epoch's metrics, across worker restarts (Ray's own result keeps
        # only the metrics of the checkpoints it kept).
        ckpt = Path(ckdir) / CHECKPOINT
        state = load_torch(ckpt, "checkpoint")
        return stages.finish_training(cfg, stage, fp, ckpt, state.get("history", []), state.get("resumed_from_epoch", 0))


def main(argv: list[str] | None = None) -> int:
    from jobs import common

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--stage", choices=stages.TRAINING_STAGES, default="student", help="which network to train")
    args = p.parse_args(argv)
    cfg = common.load(args)
    common.connect(args.address)
    with common.data_errors("jobs.train"):
        res = run_stage(cfg, args.stage, progress=not args.no_progress)
    print(f"[{args.stage}] {'skipped (up to date)' if res.skipped else 'done'}: {res.outputs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
