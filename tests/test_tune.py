"""Ray Tune over the loss weights: bad input before any trial; a real search on the session's Ray head and
MLflow server, interrupted and resumed, whose best config trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oal.config import ConfigError, load_config
from tests.conftest import QUICK


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
    assert t.model.teacher_checkpoint.endswith("digits/teacher/checkpoint.pt")
    grid = param_space(load_config("digits", ["search.algorithm=grid", "search.allow_zero=false"]).search)
    assert grid["w_micl_knn"] == {"grid_search": [pytest.approx(0.01), 0.1, pytest.approx(1.0)]}


def _finished_trials(exp_dir: Path, epochs: int) -> list[Path]:
    done = []
    for f in exp_dir.glob("*/result.json"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if any(r.get("training_iteration") == epochs for r in lines):
            done.append(f)
    return done


@pytest.mark.ray
@pytest.mark.stack
@pytest.mark.slow
def test_search_finishes_reruns_nothing_and_best_config_trains(stack, tmp_path):
    import mlflow
    import ray

    from jobs import tune as jtune
    from oal import stages

    cfg = load_config("digits", [*QUICK, f"output_dir={tmp_path}", "name=tq", "search.num_samples=4",
                                 "search.max_concurrent=2", "tracking.experiment=oal-tune-test",
                                 "tracking.system_metrics=false"])
    if not ray.is_initialized():
        ray.init(address="auto", logging_level="WARNING")
    summary = jtune.run(cfg, progress=False)
    assert len(summary["trials"]) == 4 and summary["epochs_consumed"] == 8
    objectives = [t["objective"] for t in summary["trials"]]
    assert objectives == sorted(objectives, reverse=True)

    exp_dir = next(p for p in (tmp_path / "tq" / "ray").glob("tq-tune-*") if p.is_dir())
    def reports(f: Path) -> list[tuple]:  # what a rerun trial would change: its report times
        return [(r["trial_id"], r["training_iteration"], r["timestamp"]) for r in map(json.loads, f.read_text().splitlines())]

    finished = {f: reports(f) for f in _finished_trials(exp_dir, 2)}
    assert len(finished) == 4
    again = jtune.run(cfg, progress=False)  # the same command again: restored, no trial redone
    assert [t["trial"] for t in again["trials"]] == [t["trial"] for t in summary["trials"]]
    for f, before in finished.items():
        assert reports(f) == before

    ex = mlflow.get_experiment_by_name("oal-tune-test")
    parents = mlflow.search_runs([ex.experiment_id], filter_string="tags.`oal.kind` = 'tune'", output_format="list")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the rerun continued the same run
    trials = mlflow.search_runs([ex.experiment_id], output_format="list",
                                filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}' "
                                              "and tags.`oal.kind` = 'trial'")
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)

    best = load_config(summary["best_yaml"])
    assert best.name == "tq-best" and best.loss.w_logit_kd == summary["best"]["w_logit_kd"]
    res = stages.run_student(best, progress=False)
    assert json.loads((res.dir / "stage.json").read_text())["history"][-1]["epoch"] == 2
    assert (tmp_path / "tq" / "tune" / "weights_vs_objective.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "tq" / "tune" / "trials.md").read_text()
    assert table.count("\n| ") == 5  # header + 4 trials
