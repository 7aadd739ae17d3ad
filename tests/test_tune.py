"""Ray Tune over the loss weights: bad input before any trial; a real search on the session's Ray head and
MLflow server, interrupted and resumed, whose best config trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oal.config import ConfigError, load_config
from tests.conftest import QUICK

REPO = Path(__file__).parents[1]


@pytest.mark.parametrize("override,needle", [
    ("search.weights=[w_nope]", "w_nope"),
    ("search.range_factor=0.5", "range_factor"),
    ("search.lr_min=0.5", "lr_min"),
    ("search.metric=test/auroc", "search.metric"),
    ("search.algorithm=hyperband", "search.algorithm"),
])
def test_bad_search_settings_fail_before_any_trial(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("digits", [override])


def test_space_and_trial_config():
    from ray.tune.search.sample import Categorical, Float

    from jobs.tune import param_space, trial_config

    cfg = load_config("digits", ["search.tune_lr=true"])
    space = param_space(cfg.search)
    assert isinstance(space["w_feat_kd"], Float) and space["w_feat_kd"].lower == pytest.approx(0.8)
    assert space["w_feat_kd"].upper == pytest.approx(80.0) and isinstance(space["w_feat_kd_on"], Categorical)
    params = {"w_logit_kd": 2.0, "w_logit_kd_on": True, "w_feat_kd": 3.0, "w_feat_kd_on": False,
              "w_micl_knn": 0.5, "w_micl_knn_on": True, "w_micl_lat": 0.3, "w_micl_lat_on": True, "lr": 0.02}
    t = trial_config(cfg, params, "abc")
    assert (t.loss.w_logit_kd, t.loss.w_feat_kd, t.loss.w_micl_knn, t.loss.w_micl_lat) == (2.0, 0.0, 0.5, 0.3)
    assert t.student.lr == 0.02 and t.name == "digits-trial-abc"
    assert t.teacher.checkpoint.endswith("digits/teacher/checkpoint.pt")
    grid = param_space(load_config("digits", ["search.algorithm=grid", "search.allow_zero=false"]).search)
    assert grid["w_micl_knn"] == {"grid_search": [pytest.approx(0.01), 0.1, pytest.approx(1.0)]}


def _trial_dirs(run_root: Path, name: str) -> dict[str, Path]:
    """Trial id -> the trial's run folder, for the trials whose student stage has finished."""
    return {p.name.split("-trial-")[1]: p for p in run_root.glob(f"{name}-trial-*") if (p / "student" / "stage.json").exists()}


def _checkpointed_unfinished(run_root: Path, name: str, ray_tmp: Path | None = None) -> list[str]:
    """Trial ids with a checkpoint in their Ray Train storage but no finished student stage. With `ray_tmp` (the
    head's Ray temp dir), only those whose epoch report Tune itself has received: the trial's line in result.json
    in Tune's staging folder (`<temp dir>/session_latest/artifacts/.../driver_artifacts/<trial>/`, written on each
    report, copied to the search's storage only at its syncs), so that Tune holds an objective for it."""
    cut = []
    for p in run_root.glob(f"{name}-trial-*"):
        trial = p.name.split("-trial-")[1]
        if (p / "student" / "stage.json").exists() or not any((p / "ray").rglob("checkpoint_*/checkpoint.pt")):
            continue
        staged = [] if ray_tmp is None else \
            (ray_tmp / "session_latest" / "artifacts").glob(f"*/{name}-tune-*/driver_artifacts/*{trial}*/result.json")
        if ray_tmp is None or any(r.stat().st_size for r in staged):
            cut.append(trial)
    return cut


def _train_activity(trial_dir: Path) -> list[tuple[str, int]]:
    """Every file of the trial's Ray Train storage and of its stage folder, with its modification time."""
    return sorted((str(f), f.stat().st_mtime_ns) for d in ("ray", "student") for f in (trial_dir / d).rglob("*")
                  if f.is_file())


@pytest.mark.ray
@pytest.mark.stack
@pytest.mark.slow
def test_search_interrupted_resumes_without_redoing_trials_and_best_config_trains(stack, tmp_path):
    import mlflow
    import ray

    from jobs import tune as jtune
    from oal import registry, stages
    from oal.data import build_benchmark

    overrides = [*QUICK, f"output_dir={tmp_path}", "name=tq", "search.num_samples=3", "search.max_concurrent=2",
                 "tracking.experiment=oal-tune-test", "tracking.system_metrics=false"]
    # 0. What the search builds before its trials (the teacher and outlier files the trials share, the baseline
    # student of the ID-accuracy constraint), built beforehand in this process as `oal pipeline` and `oal train`
    # build them: the search finds them up to date. On Ray they cost two Ray Train runs and five rounds of tasks and
    # actors; those paths are the pipeline's own (test_tracking, test_two_nodes) and the trials' (every trial is a
    # student stage on Ray Train, as the baseline's is).
    shared = jtune.every_term(load_config("digits", overrides))
    bench = build_benchmark(shared.data)
    prebuilt = {
        "teacher": registry.run_stage("teacher", shared, bench, progress=False),
        "embeddings": registry.run_stage("embeddings", shared, bench),
        "anchors": registry.run_stage("anchors", shared),
        "knn": registry.run_stage("knn", shared),
        "latents": registry.run_stage("latents", shared, progress=False),
    }
    baseline = jtune.baseline_config(stages.with_outlier_files(shared, prebuilt))
    prebuilt["baseline"] = registry.run_stage("student", baseline, bench, progress=False)
    # 1. The search as a user runs it, stopped with Ctrl-C once two of its three trials have finished.
    ray_tmp = stack.stack.ray_temp_dir
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.tune", "--config", "digits", "--no-progress",
                                 *overrides], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        # ... and once the third has reported a checkpoint but not finished: the resume must continue it from there
        while ((len(_trial_dirs(tmp_path, "tq")) < 2 or not _checkpointed_unfinished(tmp_path, "tq", ray_tmp))
               and proc.poll() is None and time.monotonic() < deadline):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    first = _trial_dirs(tmp_path, "tq")
    cut = _checkpointed_unfinished(tmp_path, "tq")
    out = (tmp_path / "first.log").read_text()
    assert len(first) == 2, out[-3000:]
    # Tune holds an objective for the trial cut short, yet it is not counted as finished
    assert "2 of 3 trials finished" in out, out[-3000:]
    # it says that the search is incomplete and how to resume it, and leaves no best config behind
    assert proc.returncode != 0 and "the search is incomplete" in out and "same command again" in out, out[-3000:]
    assert not (tmp_path / "tq" / "tune" / "best.yaml").exists()
    # what was built beforehand was found up to date (not built again on Ray)
    for stage, res in prebuilt.items():
        assert not res.skipped and json.loads((res.dir / "stage.json").read_text())["written_by"]["pid"] == os.getpid(), stage
    assert prebuilt["baseline"].dir == tmp_path / "tq-baseline" / "student"
    before = {t: _train_activity(d) for t, d in first.items()}

    # 2. The same command again: the search resumes; the finished trials are not trained again.
    cfg = load_config("digits", [*overrides, "search.retrain_best=true"])  # also retrains and registers the best
    if not ray.is_initialized():
        ray.init(address="auto", logging_level="WARNING")
    summary = jtune.run(cfg, progress=False)
    assert len(summary["trials"]) == 3 and summary["epochs_consumed"] == 6
    assert sorted(str(t["trial"]) for t in summary["trials"]) == sorted(_trial_dirs(tmp_path, "tq"))
    for t, files in before.items():
        assert _train_activity(first[t]) == files, f"trial {t} was trained again"
    objectives = [t["objective"] for t in summary["trials"]]
    assert objectives == sorted(objectives, reverse=True)
    # A trial cut short went on from its reported checkpoint, not from scratch
    assert cut, "no trial was cut short after a checkpoint: the resume path was not exercised"
    for t in cut:
        manifest = json.loads((_trial_dirs(tmp_path, "tq")[t] / "student" / "stage.json").read_text())
        assert manifest["resumed_from_epoch"] >= 1 and [h["epoch"] for h in manifest["history"]] == [1, 2], t
    # Trials are ranked by their last epoch's numbers (what retraining the config gives), not their best epoch's
    dirs = _trial_dirs(tmp_path, "tq")
    for t in summary["trials"]:
        last = json.loads((dirs[str(t["trial"])] / "student" / "stage.json").read_text())["history"][-1]
        assert t["epochs"] == 2 and last["epoch"] == 2
        assert t["val_ood_auroc"] == pytest.approx(last["val/ood_auroc"], abs=1e-9), t["trial"]

    ex = mlflow.get_experiment_by_name("oal-tune-test")
    parents = mlflow.search_runs([ex.experiment_id], filter_string="tags.`oal.kind` = 'tune'", output_format="list")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the resumed search continued its run
    trials = mlflow.search_runs([ex.experiment_id], output_format="list",
                                filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}' "
                                              "and tags.`oal.kind` = 'trial'")
    assert len(trials) == 3 and all(t.info.status == "FINISHED" for t in trials)

    # the best trial's detector, trained again and scored on the test sets, is the registry's champion
    from mlflow.tracking import MlflowClient

    champion = MlflowClient().get_model_version_by_alias("oal-tq", "champion")
    det_runs = mlflow.search_runs([ex.experiment_id], output_format="list",
                                  filter_string="tags.`oal.stage` = 'detector'")
    assert [r.info.run_id for r in det_runs] == [champion.run_id]
    assert summary["test"]["id_accuracy"] > 0  # evaluated on the test sets before it was promoted
    assert json.loads((tmp_path / "tq-best" / "detector" / "stage.json").read_text())["score"] == \
        det_runs[0].data.tags["oal.score"]

    best = load_config(summary["best_yaml"])
    assert best.name == "tq-best" and best.loss.w_logit_kd == summary["best"]["w_logit_kd"]
    res = registry.run_stage("student", best, progress=False)
    assert json.loads((res.dir / "stage.json").read_text())["history"][-1]["epoch"] == 2
    assert (tmp_path / "tq" / "tune" / "weights_vs_objective.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "tq" / "tune" / "trials.md").read_text()
    assert table.count("\n| ") == 4  # header + 3 trials


@pytest.mark.ray
def test_a_trial_leaves_every_cpu_to_its_trainer(ray_head):
    """A trial's actor only waits on its Ray Train run. What it reserves (jobs.tune.TRIAL_RESOURCES, as Tune turns
    it into a placement group) and a trainer asking for every CPU of the node (the fashion preset's 2 workers'
    worth on a 2-core machine) are both placed on the session's real head; with 0.01 CPU for the trial the
    trainer waited forever."""
    import ray
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory
    from ray.util.placement_group import placement_group, remove_placement_group

    from jobs.tune import TRIAL_RESOURCES

    if not ray.is_initialized():
        ray.init(address="auto", logging_level="WARNING")
    trial = resource_dict_to_pg_factory(TRIAL_RESOURCES)
    trial_pg = placement_group(trial.bundles, strategy=trial.strategy)
    trainer_pg = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    try:
        assert trial_pg.wait(timeout_seconds=30) and trainer_pg.wait(timeout_seconds=30)
    finally:
        remove_placement_group(trial_pg)
        remove_placement_group(trainer_pg)
