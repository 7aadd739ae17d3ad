"""An unreachable S3 endpoint behind a real MLflow server: the run fails fast, naming the endpoint, and is
marked FAILED, never FINISHED with missing artifacts. Uses its own S3 + MLflow pair (not the session's,
whose S3 server must stay up) and stops its S3 server for real."""

from __future__ import annotations

import json
import os
import time

import pytest

from cluster.stack import Stack
from oal.config import load_config
from oal.stages import StageResult
from oal.tracking import Tracker
from tests.conftest import QUICK
from tests.stack_fixtures import free_ports

pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture()
def dead_s3(tmp_path, monkeypatch):
    s3_port, mlflow_port = free_ports(2)
    stack = Stack(state_dir=tmp_path / "stack", s3_port=s3_port, mlflow_port=mlflow_port, access_key="testing",
                  secret_key="testing", echo=lambda _: None)
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        env = stack.up(["s3", "mlflow"])
        # MLFLOW_TRACKING_URI too: mlflow.set_tracking_uri (the Tracker calls it) writes it into os.environ,
        # and later tests and their subprocesses would find this dead server there.
        # Its own MLflow login too: this server generated its own passwords, unlike the session's stack.
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                  "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(k, env[k])
        yield stack, env
    finally:
        stack.down()
        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None unsets: the process-wide default back


def test_s3_down_fails_the_stage_and_the_pipeline_run(dead_s3, tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs import pipeline

    stack, env = dead_s3
    uri, endpoint = env["MLFLOW_TRACKING_URI"], env["MLFLOW_S3_ENDPOINT_URL"]
    cfg = load_config("digits", [*QUICK, f"output_dir={tmp_path}", "name=s3f"])
    tracker = Tracker(uri, "s3-faults", system_metrics=False)
    stage_dir = tmp_path / "knn"
    stage_dir.mkdir()
    (stage_dir / "stage.json").write_text(json.dumps({"stage": "knn"}))
    result = StageResult("knn", stage_dir, "fp", False, {})

    # S3 goes away mid-run: the stage that cannot store its files fails, and the pipeline run with it.
    with pytest.raises(RuntimeError, match="record the knn stage's files") as err:
        with tracker.pipeline_run(cfg):  # S3 is up: the config artifact is stored
            stack.down(["s3"])
            assert not stack.status()["s3"] and stack.status()["mlflow"]
            with tracker.stage("knn", cfg):
                tracker.record_stage(result)
    assert endpoint in str(err.value) and uri in str(err.value)

    # S3 down from the start: the pipeline fails at its first artifact, in seconds, before any stage runs.
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot store artifacts") as err:
        pipeline.run(cfg, progress=False, tracker=Tracker(uri, "s3-faults", system_metrics=False))
    elapsed = time.monotonic() - t0
    assert endpoint in str(err.value)
    assert "(caused by ResponseError('too many 500 error responses'))" in str(err.value)  # past the request's URL
    assert elapsed < 30, f"took {elapsed:.0f} s to give up on a dead S3 endpoint"
    assert not (tmp_path / "s3f" / "teacher").exists()  # no work was done

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("s3-faults").experiment_id])
    kinds = sorted((r.data.tags.get("oal.kind"), r.info.status) for r in runs)
    assert kinds == [("pipeline", "FAILED"), ("pipeline", "FAILED"), ("stage", "FAILED")]
