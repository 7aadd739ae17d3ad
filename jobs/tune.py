"""Ray Tune over the OAL loss weights (and optionally the learning rate).

Each trial is a Ray Train run of the student (Train v2 inside a Tune function trainable, reporting back
through `TuneReportCallback`), so one trial can use several GPUs and trials run concurrently from the
cluster's resources. The objective is the validation OOD AUROC (never a test set), pushed below every
valid trial when the trial loses more ID validation accuracy than `search.max_id_acc_drop` against the
teacher-free, outlier-free baseline. An interrupted search resumes (`Tuner.restore`).

    python -m jobs.tune --config digits search.num_samples=8 search.scheduler=asha
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from oal import config as C
from oal import registry, stages, storage
from oal.storage import write_json, write_text
from oal.tracking import Tracker

log = logging.getLogger("oal.jobs.tune")
# See `run`: a trial's actor takes nothing from its trainer's workers.
TRIAL_RESOURCES: dict[str, float] = {"cpu": 0.0, "memory": 1.0}
REFERENCE = C.REFERENCE_WEIGHTS  # the reference's weights: 4, 8, 0.1, 0.2 (energy variant: 2.5, 2.5)


def param_space(s: C.SearchConfig) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    f = s.range_factor
    for w in s.weights:
        ref = REFERENCE[w]
        if s.algorithm == "grid":
            space[w] = tune.grid_search(([0.0] if s.allow_zero else []) + [ref / f, ref, ref * f])
        else:
            space[w] = tune.loguniform(ref / f, ref * f)
            if s.allow_zero:
                space[f"{w}_on"] = tune.choice([True, False])  # False = this term off (an ablation)
    if s.tune_lr:
        space["lr"] = tune.loguniform(s.lr_min, s.lr_max)
    return space


def trial_name(base: C.OALConfig, trial_id: str) -> str:
    """A trial's run name (its run folder under `output_dir`; its Ray Train run is `<name>-student`)."""
    return f"{base.name}-trial-{trial_id}"


def every_term(cfg: C.OALConfig) -> C.OALConfig:
    """The config the shared stages are built for: each searched weight at least the reference's, so that
    the outlier files exist for every term a trial may switch on."""
    return replace(cfg, loss=replace(cfg.loss, **{w: max(getattr(cfg.loss, w), REFERENCE[w])
                                                  for w in cfg.search.weights}))


def objective_spec(s: C.SearchConfig, base_acc: float) -> dict[str, Any]:
    """What `jobs.train.with_objective` needs: the searched metric and the least ID accuracy a trial may keep."""
    return {"metric": s.metric, "min_id_acc": base_acc - s.max_id_acc_drop}


def trial_config(base: C.OALConfig, params: dict[str, Any], trial_id: str) -> C.OALConfig:
    """The student config of one trial: searched weights applied, its own run folder."""
    weights: dict[str, Any] = {w: (float(params[w]) if params.get(f"{w}_on", True) else 0.0)
                               for w in base.search.weights}
    student = replace(base.student, lr=float(params["lr"])) if "lr" in params else base.student
    return replace(shared_checkpoints(base), name=trial_name(base, trial_id), loss=replace(base.loss, **weights),
                   student=student)


def shared_checkpoints(base: C.OALConfig) -> C.OALConfig:
    """`base` reading the search's own teacher and base student, for a run under another name (a trial, the
    baseline, the best)."""
    return replace(base, teacher=replace(base.teacher, checkpoint=str(stages.teacher_checkpoint(base))),
                   base=replace(base.base, checkpoint=str(stages.base_checkpoint(base))))


def _trial(params: dict[str, Any], base_dict: dict, mlflow_info: dict, objective: dict, object_cache: str) -> None:
    """A Tune function trainable: one Ray Train run of the student with this trial's weights.

    The trial trains into its own run folder and writes the stage manifest there when it ends. A trial that
    Tune runs again after an interrupted search (it had finished, but the experiment state saved before the
    interruption did not say so) finds that manifest and replays its per-epoch reports instead of training."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.common import in_worker
    from jobs.train import run_stage, with_objective

    in_worker(object_cache)  # the driver's: its mirror paths are in base_dict
    base = C.from_dict(base_dict)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, trial_id)
    run_id = _trial_mlflow_run(cfg, base, mlflow_info, trial_id)
    res = run_stage(cfg, "student", progress=False, mlflow_run_id=run_id, callbacks=[TuneReportCallback()],
                    objective=objective, run_name=f"{cfg.name}-student")
    if res.skipped:  # up to date: trained before the search was interrupted
        log.info("trial %s finished before the search was interrupted: replaying its reports", trial_id)
        for row in (stages.read_manifest(res.dir) or {})["history"]:
            tune.report(with_objective(row, objective))
    if run_id:
        from mlflow.tracking import MlflowClient

        MlflowClient(mlflow_info["uri"]).set_terminated(run_id, "FINISHED")


def _trial_mlflow_run(cfg: C.OALConfig, base: C.OALConfig, mlflow_info: dict, trial_id: str) -> str | None:
    """The trial's child run under the tune run; a trial restarted after an interruption keeps its run."""
    if not mlflow_info["uri"]:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_info["uri"])
    record = cfg.run_dir / "mlflow_run.json"
    known = storage.read_text(record)  # asked of the bucket with an s3:// output_dir: the trial may restart elsewhere
    if known is not None:
        return str(json.loads(known)["run_id"])
    run = client.create_run(mlflow_info["experiment_id"], run_name=f"trial-{trial_id}",
                            tags={"mlflow.parentRunId": mlflow_info["parent"], "oal.kind": "trial"})
    for k, v in {**{w: getattr(cfg.loss, w) for w in base.search.weights}, "student.lr": cfg.student.lr}.items():
        client.log_param(run.info.run_id, k, v)
    write_json({"run_id": run.info.run_id}, record)
    return str(run.info.run_id)


def finished_trials(path: str) -> int:
    """The trials that the search's saved state at `path` records as finished (TERMINATED: run to their end, or
    stopped by the scheduler): those a resumed search does not run again. Not what the grid `Tuner.fit` returns
    says: after Ctrl-C, Tune saves the state (a running trial saved to be resumed) and then stops the running
    trials, which that grid then counts as TERMINATED too, with the epochs they had reported."""
    from ray.tune import ExperimentAnalysis

    return sum(t.status == "TERMINATED" for t in ExperimentAnalysis(path).trials)


class SearchIncomplete(RuntimeError):
    """Some trials did not finish (the search was interrupted, or trials failed): no best config is written."""


def expected_trials(s: C.SearchConfig, space: dict[str, Any]) -> int:
    n = s.num_samples
    for v in space.values():
        if isinstance(v, dict) and "grid_search" in v:
            n *= len(v["grid_search"])
    return n


def _searcher(s: C.SearchConfig, seed: int) -> Any:
    if s.algorithm == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=TPESampler(seed=seed))
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # A SearchGenerator takes its concurrency limit itself (Tune ignores max_concurrent_trials for it).
    return BasicVariantGenerator(random_state=seed, max_concurrent=s.max_concurrent)


def _scheduler(s: C.SearchConfig, epochs: int) -> Any:
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # time: the student's epoch as reported, not Tune's count of reports, which restarts from 1 for a trial that
        # resumed its Ray Train run from a checkpoint after an interrupted search
        return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def baseline_config(cfg: C.OALConfig) -> C.OALConfig:
    """The teacher-free, outlier-free student of the ID-accuracy constraint, in its own run folder."""
    return replace(shared_checkpoints(cfg), name=f"{cfg.name}-baseline",
                   loss=replace(cfg.loss, **{w: 0.0 for w in C.LOSS_WEIGHTS}))  # type: ignore[arg-type]


def baseline_accuracy(cfg: C.OALConfig, progress: bool) -> float:
    """ID validation accuracy of the baseline student (the constraint's reference), at its last epoch."""
    from jobs.train import run_stage

    res = run_stage(baseline_config(cfg), "student", progress)
    history = json.loads(storage.pull(res.dir / stages.MANIFEST).read_text())["history"]
    return float(history[-1]["val/id_accuracy"])


def run(cfg: C.OALConfig, progress: bool = True, tracker: Tracker | None = None) -> dict[str, Any]:
    from ray import tune

    from jobs import pipeline

    s = cfg.search
    tracker = tracker or Tracker.from_env(cfg)
    out = cfg.run_dir / "tune"
    results: dict[str, stages.StageResult] = {}
    ray_storage = cfg.ray_storage
    parent_file = out / "mlflow_parent.json"  # so that a resumed search keeps one parent run
    resume_parent = None
    # read from the store under an s3:// output_dir, as the search state is; only when there is a run to resume
    record = storage.read_text(parent_file) if tracker.enabled else None
    if record and tune.Tuner.can_restore(json.loads(record)["path"]):
        resume_parent = json.loads(record)["run_id"]
    with tracker.pipeline_run(cfg, kind="tune", resume_run_id=resume_parent) as parent_id:
        full = pipeline.prepare(every_term(cfg), tracker, results, progress)
        base_acc = baseline_accuracy(full, progress)
        log.info("baseline ID validation accuracy %.4f; trials may lose at most %.3f", base_acc, s.max_id_acc_drop)
        mlflow_info = {"uri": tracker.uri if tracker.enabled else None, "parent": parent_id, "experiment_id": None}
        if tracker.enabled and parent_id:
            from mlflow.tracking import MlflowClient

            mlflow_info["experiment_id"] = MlflowClient(tracker.uri).get_run(parent_id).info.experiment_id
        space = param_space(s)
        # The trial's own actor only waits on its Ray Train run, whose workers hold the real resources. It asks for
        # one byte of memory and no CPU: a fraction of a CPU would be taken from the trainer's workers, which then
        # never fit when they ask for every CPU of a node (the fashion preset's 2 on a 2-core machine).
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base_dict=C.to_dict(full), mlflow_info=mlflow_info,
                                 objective=objective_spec(s, base_acc), object_cache=str(storage.cache_root())),
            TRIAL_RESOURCES)
        # what the trials are: retraining the best afterwards is not (a search resumed with it is the same search)
        trials = C.fingerprint(replace(s, retrain_best=False), registry.fingerprint("student", full))
        name = f"{cfg.name}-tune-{trials}"
        path = f"{ray_storage.rstrip('/')}/{name}"
        if parent_id:
            write_json({"run_id": parent_id, "path": path}, parent_file)
        if tune.Tuner.can_restore(path):
            log.info("resuming the search at %s", path)
            tuner = tune.Tuner.restore(path, trainable, resume_errored=True, param_space=space)
        else:
            tuner = tune.Tuner(trainable, param_space=space, tune_config=tune.TuneConfig(
                metric="objective", mode="max", search_alg=_searcher(s, cfg.seed),
                scheduler=_scheduler(s, cfg.student.epochs), num_samples=s.num_samples,
                max_concurrent_trials=s.max_concurrent if s.algorithm == "optuna" else None),
                run_config=tune.RunConfig(name=name, storage_path=ray_storage))
        grid = tuner.fit()
        finished = finished_trials(path)
        expected = expected_trials(s, space)
        if finished < expected:  # Ctrl-C (Tune saves its state and returns) or failed trials
            raise SearchIncomplete(
                f"the search is incomplete: {finished} of {expected} trials finished"
                f"{f' ({grid.num_errors} failed)' if grid.num_errors else ''}. Run the same command again to "
                f"resume it (finished trials are kept, failed ones retried); state: {path}")
        summary = summarize(full, grid, out, base_acc)
        if tracker.enabled:
            import mlflow

            _close_stopped_trials(tracker, parent_id)
            mlflow.log_metric("best_objective", summary["best"]["objective"])
            mlflow.log_metric("epochs_consumed", summary["epochs_consumed"])
            for f in ("trials.md", "trials.json", "best.yaml", "weights_vs_objective.png"):
                if (out / f).exists():
                    mlflow.log_artifact(str(out / f))
        if s.retrain_best:
            from oal.tracking import registered_model_name

            best_cfg = C.load_config(str(out / "best.yaml"))
            # its detector, once evaluated on the test sets, is the registry's champion under the pipeline's name
            best_cfg = replace(best_cfg, tracking=replace(best_cfg.tracking, registered_model=registered_model_name(full)))
            tracker.detector_alias = "champion"
            pipeline.train_and_evaluate(best_cfg, tracker, results, progress)
            summary["test"] = json.loads(storage.pull(results["eval"].outputs["results"]).read_text())
    return summary


def _close_stopped_trials(tracker: Tracker, parent_id: str | None) -> None:
    """Trials stopped by ASHA leave their MLflow runs RUNNING: mark them KILLED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracker.uri)
    exp = client.get_experiment_by_name(tracker.experiment)
    if exp is None:
        return
    for r in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
        if r.info.status == "RUNNING" and r.data.tags.get("oal.kind") == "trial":
            client.set_terminated(r.info.run_id, "KILLED")


def summarize(cfg: C.OALConfig, grid: Any, out: Path, base_acc: float) -> dict[str, Any]:
    """The trials table (sorted), the best weights as a preset YAML, and a weights-vs-objective plot."""
    rows = []
    for r in grid:
        if r.metrics is None or "objective" not in r.metrics:
            continue
        params = dict(r.config)
        trial_cfg = trial_config(cfg, params, r.metrics.get("trial_id", "?"))
        # The last epoch's objective: what retraining the config for the same epochs gives (not the best of
        # every validation check on the way, which would be optimistic).
        best_obj = float(r.metrics["objective"])
        rows.append({"trial": r.metrics.get("trial_id", "?"), "objective": best_obj,
                     "val_ood_auroc": float(r.metrics.get("val/ood_auroc", math.nan)),
                     "val_id_accuracy": float(r.metrics.get("val/id_accuracy", math.nan)),
                     "epochs": int(r.metrics.get("epoch", r.metrics.get("training_iteration", 0))),
                     **{w: getattr(trial_cfg.loss, w) for w in cfg.search.weights},
                     **({"lr": trial_cfg.student.lr} if cfg.search.tune_lr else {}), "_params": params})
    if not rows:
        raise RuntimeError(f"no trial reported '{cfg.search.metric}'; see the Ray Tune logs")
    rows.sort(key=lambda r: -r["objective"])
    best = rows[0]
    best_cfg = trial_config(cfg, best["_params"], "best")
    best_cfg = replace(best_cfg, name=f"{cfg.name}-best")
    out.mkdir(parents=True, exist_ok=True)
    write_text(C.to_yaml(best_cfg), out / "best.yaml")
    cols = ["trial", "objective", "val_ood_auroc", "val_id_accuracy", "epochs", *cfg.search.weights,
            *(["lr"] if cfg.search.tune_lr else [])]
    lines = [f"Baseline ID val accuracy {base_acc:.4f}; objective = {cfg.search.metric} (minus 1 when ID accuracy "
             f"drops more than {cfg.search.max_id_acc_drop}).", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    write_text("\n".join(lines) + "\n", out / "trials.md")
    clean = [{k: v for k, v in r.items() if k != "_params"} for r in rows]
    write_json(clean, out / "trials.json")
    _plot(clean, cfg.search.weights, out / "weights_vs_objective.png")
    return {"best": clean[0], "trials": clean, "epochs_consumed": sum(r["epochs"] for r in rows),
            "best_yaml": str(out / "best.yaml")}


def _plot(rows: list[dict], weights: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oal.storage import atomic_path

    fig, axes = plt.subplots(1, len(weights), figsize=(3.2 * len(weights), 3), squeeze=False)
    for ax, w in zip(axes[0], weights):
        xs = [max(r[w], 1e-4) for r in rows]
        ax.scatter(xs, [r["objective"] for r in rows], c=["tab:red" if r[w] == 0 else "tab:blue" for r in rows])
        ax.set(xscale="log", xlabel=f"{w} (red: off)", ylabel="objective")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from jobs import common

    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = common.load(args)
    common.connect(args.address)
    try:
        with common.data_errors("jobs.tune"):
            summary = run(cfg, progress=not args.no_progress)
    except SearchIncomplete as e:
        print(f"jobs.tune: {e}", file=sys.stderr)
        return 1
    print((cfg.run_dir / "tune" / "trials.md").read_text())
    print(f"best config: {summary['best_yaml']}  (epochs consumed: {summary['epochs_consumed']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
