"""Tracking without a server: disabled means no-op; a dead server means buffered metrics, bounded time."""

import json
import socket
import time

from oal.config import load_config
from oal.tracking import MetricLogger, Tracker


def test_disabled_tracker_is_a_no_op(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("digits")
    t = Tracker.from_env(cfg)
    assert not t.enabled
    with t.pipeline_run(cfg) as run_id, t.stage("teacher", cfg) as sr:
        assert run_id is None and sr.run_id is None
        sr.metrics.log({"loss": 1.0}, step=1)
        t.record_stage(object())


def test_dead_server_buffers_metrics_quickly(tmp_path, monkeypatch):
    import mlflow

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Whatever server an earlier test left MLflow pointed at (its environment or set_tracking_uri), the logger
    # writes to the URI it was given: here a dead one, so the failures below are connection failures.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", "http://127.0.0.1:1")
    buf = tmp_path / "tracking_buffer.jsonl"
    logger = MetricLogger("0123456789abcdef", buf, f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    logger.log({"loss_ce": 0.5, "lr": 0.1}, step=3)
    assert time.perf_counter() - t0 < 30  # bounded retries, not minutes of back-off
    assert logger.failed == 2
    assert f"127.0.0.1:{port}" in logger.last_error and "RESOURCE_DOES_NOT_EXIST" not in logger.last_error
    row = json.loads(buf.read_text().splitlines()[0])
    assert row == {"run_id": "0123456789abcdef", "step": 3, "metrics": {"loss_ce": 0.5, "lr": 0.1}}


def test_a_tracking_server_that_does_not_answer_stops_the_pipeline_at_once(tmp_path):
    import pytest

    from jobs import pipeline

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = load_config("digits", [f"output_dir={tmp_path}", f"tracking.uri={dead}"])
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=f"MLflow tracking server {dead} does not answer"):
        pipeline.run(cfg, progress=False)  # no Ray needed: it stops before the first stage
    assert time.perf_counter() - t0 < 15
    assert not (tmp_path / "digits").exists() or not any((tmp_path / "digits").iterdir())  # no stage started
