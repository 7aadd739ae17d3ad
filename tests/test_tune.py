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
def test_search_interrupted_resumes_and_best_config_trains(stack, tmp_path):
    import mlflow
    import ray

    from jobs import tune as jtune
    from oal import stages

    overrides = [*QUICK, f"output_dir={tmp_path}", "name=tq", "search.num_samples=4", "search.max_concurrent=1",
                 "tracking.experiment=oal-tune-test", "tracking.system_metrics=false"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tune", "--config", "digits", *overrides], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ray_dir = tmp_path / "tq" / "ray"
    deadline = time.time() + 400
    exp_dirs: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        exp_dirs = [p for p in ray_dir.glob("tq-tune-*") if p.is_dir()]
        if exp_dirs and len(_finished_trials(exp_dirs[0], 2)) >= 2:
            break
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
    proc.send_signal(signal.SIGINT)  # what Ctrl-C or a stopped job does to the search
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
    exp = exp_dirs[0]
    finished = {f: f.stat().st_mtime_ns for f in _finished_trials(exp, 2)}
    assert 2 <= len(finished) < 4

    cfg = load_config("digits", overrides)  # tmp_path is absolute, as the job's own paths are
    if not ray.is_initialized():
        ray.init(address="auto", logging_level="WARNING")
    summary = jtune.run(cfg, progress=False)
    assert len(summary["trials"]) == 4
    for f, mtime in finished.items():  # finished trials were not run again
        assert f.stat().st_mtime_ns == mtime
    assert summary["epochs_consumed"] == 8

    ex = mlflow.get_experiment_by_name("oal-tune-test")
    parents = mlflow.search_runs([ex.experiment_id], filter_string="tags.`oal.kind` = 'tune'", output_format="list")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = mlflow.search_runs([ex.experiment_id], output_format="list",
                                filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}' "
                                              "and tags.`oal.kind` = 'trial'")
    assert len(trials) == 4

    best = load_config(summary["best_yaml"])
    assert best.name == "tq-best" and best.loss.w_logit_kd == summary["best"]["w_logit_kd"]
    res = stages.run_student(best, progress=False)
    assert json.loads((res.dir / "stage.json").read_text())["history"][-1]["epoch"] == 2
    assert (tmp_path / "tq" / "tune" / "weights_vs_objective.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "tq" / "tune" / "trials.md").read_text()
    assert table.count("\n| ") == 5  # header + 4 trials
