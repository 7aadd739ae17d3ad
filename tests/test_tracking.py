"""MLflow tracking against the session's real MLflow server (SQLite store, artifacts proxied to the real
S3 server on loopback), after one real pipeline run on the real Ray head; then the UI in headless Chromium."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import QUICK

pytestmark = [pytest.mark.stack, pytest.mark.ray, pytest.mark.slow]
SENTINEL = "SENTINEL-secret-9f3b1c"
# The diffusion stage too: the built-in model trained on the ID images, one epoch per phase
LDM = ("diffusion.model=builtin-ldm", "ldm.vae_epochs=1", "ldm.epochs=1", "ldm.eval_samples=2", "ldm.grid_per_class=2")
DOCS = Path(__file__).parents[1] / "docs"


@pytest.fixture(scope="module")
def tracked_run(stack, tmp_path_factory):
    """One quick pipeline on Ray with tracking on, with a sentinel S3 secret in the client environment."""
    import mlflow
    import ray

    from jobs import pipeline
    from oal.config import load_config

    out = tmp_path_factory.mktemp("tracked")
    old = os.environ.get("AWS_SECRET_ACCESS_KEY")
    os.environ["AWS_SECRET_ACCESS_KEY"] = SENTINEL  # the client side never needs it: artifacts go via MLflow
    log = out / "driver.log"
    try:
        if not ray.is_initialized():
            ray.init(address="auto", logging_level="WARNING")
        cfg = load_config("digits", [*QUICK, f"output_dir={out}", "name=tracked", "tracking.experiment=oal-test",
                          "eval.plots=true", "eval.baseline=true", *LDM])
        import logging

        handler = logging.FileHandler(log)
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        try:
            results = pipeline.run(cfg, progress=False)
        finally:
            logging.getLogger().removeHandler(handler)
    finally:
        if old is None:
            os.environ.pop("AWS_SECRET_ACCESS_KEY", None)
        else:
            os.environ["AWS_SECRET_ACCESS_KEY"] = old
    exp = mlflow.get_experiment_by_name("oal-test")
    parent = mlflow.search_runs([exp.experiment_id], filter_string="tags.`oal.kind` = 'pipeline'",
                                output_format="list")[0]
    return {"out": out, "results": results, "exp": exp, "parent": parent, "log": log}


def _children(run):
    import mlflow

    return {r.info.run_name: r for r in mlflow.search_runs(
        [run["exp"].experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run['parent'].info.run_id}'",
        output_format="list")}


def test_parent_and_child_runs(tracked_run):
    parent = tracked_run["parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["student.epochs"] == "2" and parent.data.params["loss.w_feat_kd"] == "8.0"
    assert parent.data.tags["diffusion_untrained"] == "false" and len(parent.data.tags["git_commit"]) >= 7
    assert 0 < parent.data.metrics["id_accuracy"] <= 1
    assert 0 < parent.data.metrics["base_id_accuracy"] <= 1  # the CE baseline's headline numbers beside OAL's
    assert {"base_near_auroc", "base_far_auroc", "near_auroc", "far_auroc"} <= set(parent.data.metrics)
    kids = _children(tracked_run)
    assert set(kids) == {"base", "teacher", "diffusion", "embeddings", "anchors", "knn", "latents", "student",
                         "eval_base", "eval"}
    assert all(k.info.status == "FINISHED" for k in kids.values())


def test_diffusion_stage_on_ray_train_is_measured_and_logged(tracked_run):
    """The built-in model trained on Ray Train: per-epoch losses of both phases, its class-conditional accuracy
    (a fraction the teacher judged), the quality file and the decoded grid, all in its MLflow run."""
    import json

    from mlflow.tracking import MlflowClient

    run = _children(tracked_run)["diffusion"]
    m = run.data.metrics
    assert 0.0 <= m["class_conditional_accuracy"] <= 1.0 and 0.0 < m["teacher_val_accuracy"] <= 1.0
    client = MlflowClient()
    assert [x.step for x in client.get_metric_history(run.info.run_id, "loss_reconstruction")] == [1]
    assert [x.step for x in client.get_metric_history(run.info.run_id, "loss_noise_mse")] == [2]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"quality.json", "grid.png", "stage.json"} <= names
    d = tracked_run["out"] / "tracked" / "diffusion"
    quality = json.loads((d / "quality.json").read_text())
    assert quality["samples_per_class"] == 2 and set(quality["per_class"]) == {"zero", "one", "two", "three", "four",
                                                                              "five"}
    assert quality["accuracy"] == pytest.approx(m["class_conditional_accuracy"])
    # later stages used the trained model, not the untrained one
    anchors = json.loads((tracked_run["out"] / "tracked" / "anchors" / "stage.json").read_text())
    assert anchors["model_id"].startswith("builtin-ldm (trained")


def test_metrics_per_epoch_and_per_ood_set(tracked_run):
    from mlflow.tracking import MlflowClient

    kids = _children(tracked_run)
    client = MlflowClient()
    ce = client.get_metric_history(kids["student"].info.run_id, "loss_ce")
    assert [m.step for m in ce] == [1, 2]  # logged live by rank 0, one per epoch
    for name in ("loss_logit_kd", "loss_feat_kd", "loss_micl_knn", "loss_micl_lat", "lr", "val_id_accuracy",
                 "val_ood_auroc"):
        assert len(client.get_metric_history(kids["student"].info.run_id, name)) == 2, name
    ev = kids["eval"].data.metrics
    import json

    local = json.loads((tracked_run["out"] / "tracked" / "eval" / "results.json").read_text())
    assert ev["ebo_near_auroc"] == pytest.approx(local["results"]["ebo"]["near"]["auroc"])
    assert {"ebo_digits678_auroc", "ebo_photo_patches_fpr95", "knn_far_auroc"} <= set(ev)
    assert any(k.startswith("system/") for k in client.get_run(kids["student"].info.run_id).data.metrics)


def test_artifacts_are_in_s3(tracked_run, stack):
    import boto3
    from mlflow.tracking import MlflowClient

    kids = _children(tracked_run)
    client = MlflowClient()
    names = {f.path for f in client.list_artifacts(kids["eval"].info.run_id)}
    assert {"results.md", "results.json", "plots", "stage.json", "config.yaml"} <= names
    assert {f.path for f in client.list_artifacts(kids["latents"].info.run_id)} >= {"manifest.json", "grid.png"}
    assert kids["latents"].data.tags["latents_uri"].endswith("latents")
    s3 = boto3.client("s3", endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.env["OAL_S3_BUCKET"]).get("Contents", [])]
    eval_id = kids["eval"].info.run_id
    assert any(k.endswith(f"{eval_id}/artifacts/results.md") for k in keys)
    assert any(k.endswith(f"{eval_id}/artifacts/plots/ebo_noise.png") for k in keys)
    import mlflow

    models = mlflow.search_logged_models(experiment_ids=[tracked_run["exp"].experiment_id], output_format="list")
    assert any(m.name == "student" for m in models)


def test_no_secret_reaches_mlflow_s3_or_logs(tracked_run, stack):
    import boto3

    db = Path(stack.state_dir) / "mlflow.db"
    con = sqlite3.connect(db)
    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'"):
        for row in con.execute(f'SELECT * FROM "{table}"'):
            assert SENTINEL not in repr(row), table
    s3 = boto3.client("s3", endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"])
    bucket = stack.env["OAL_S3_BUCKET"]
    objects = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert objects
    for o in objects:
        assert SENTINEL.encode() not in s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read(), o["Key"]
    for f in tracked_run["out"].rglob("*"):
        if f.is_file() and f.suffix in (".json", ".yaml", ".md", ".log", ".jsonl"):
            assert SENTINEL not in f.read_text(errors="ignore"), f
    for f in Path(stack.state_dir).rglob("*.log"):
        assert SENTINEL not in f.read_text(errors="ignore"), f


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is required for the UI check: `apt-get install chromium` (.ci/run does)")
    return exe


def _browse(url: str, tmp: Path, screenshot: Path | None = None) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp}", "--virtual-time-budget=20000", "--window-size=1400,900"]
    if screenshot is not None:
        subprocess.run([_chromium(), *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    return subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True,
                          timeout=120).stdout


def test_mlflow_ui_in_headless_chromium(tracked_run, stack, tmp_path):
    base = stack.env["MLFLOW_TRACKING_URI"].rstrip("/")
    exp_id = tracked_run["exp"].experiment_id
    DOCS.mkdir(exist_ok=True)
    dom = _browse(f"{base}/#/experiments/{exp_id}/runs", tmp_path / "a", DOCS / "mlflow-experiment.png")
    assert "tracked-pipeline" in dom
    eval_run = _children(tracked_run)["eval"]
    dom = _browse(f"{base}/#/experiments/{exp_id}/runs/{eval_run.info.run_id}", tmp_path / "b",
                  DOCS / "mlflow-run.png")
    assert "eval" in dom
    value = eval_run.data.metrics["ebo_near_auroc"]
    shown = {f"{value:.{k}f}" for k in range(3, 7)} | {str(value), f"{value:.4g}"}
    assert any(v in dom for v in shown), f"the run page shows none of {shown}"
    assert (DOCS / "mlflow-run.png").read_bytes()[:4] == b"\x89PNG"
