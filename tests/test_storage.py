"""output_dir=s3://...: stages write through to a real S3 server (moto_server, started here) and read back from it.

Each test starts its own server on a free loopback port, so that one can be paused (SIGSTOP) mid-write or run with
authentication on without touching the session's stack."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oal import registry, stages, storage
from oal.config import load_config
from tests.conftest import QUICK
from tests.stack_fixtures import free_ports

pytestmark = pytest.mark.stack


class S3Server:
    def __init__(self, tmp: Path, env: dict[str, str] | None = None):
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        moto = Path(sys.executable).with_name("moto_server")
        self.log = open(tmp / f"moto-{self.port}.log", "w")
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                     env={**os.environ, **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        import urllib.error
        import urllib.request

        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except urllib.error.HTTPError:  # it answered (an authenticating server refuses the anonymous GET)
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {(tmp / f'moto-{self.port}.log').read_text()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)  # in case a test left it paused
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A fresh S3 server with bucket 'runs', this process's clients pointed at it, and an empty mirror."""
    server = S3Server(tmp_path)
    for k, v in {"AWS_ENDPOINT_URL_S3": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 storage.OBJECT_CACHE_ENV: str(tmp_path / "mirror-a")}.items():
        monkeypatch.setenv(k, v)
    storage.client().create_bucket(Bucket="runs")
    yield server
    server.stop()


def _keys(prefix: str) -> list[str]:
    got = storage.client().list_objects_v2(Bucket="runs", Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in got)


def _manifest(key: str) -> dict:
    return json.loads(storage.client().get_object(Bucket="runs", Key=key)["Body"].read())


def test_pipeline_on_s3_is_found_complete_by_a_node_with_an_empty_mirror(s3, tmp_path, monkeypatch, caplog):
    cfg = load_config("digits", [*QUICK, "eval.baseline=true", "output_dir=s3://runs/team/exp"])
    assert cfg.run_dir == tmp_path / "mirror-a" / "s3" / "runs" / "team" / "exp" / "digits"
    assert cfg.ray_storage == "s3://runs/team/exp/digits/ray"
    registry.run_pipeline(cfg, progress=False)

    keys = _keys("team/exp/digits/")
    for stage in ("base", "teacher", "embeddings", "anchors", "knn", "latents", "student", "eval_base", "eval",
                  "detector"):
        m = _manifest(f"team/exp/digits/{stage}/stage.json")
        # every output is named by its URI and is in the store, not only on this node
        for out in m["outputs"].values():
            assert out.startswith("s3://runs/team/exp/digits/"), (stage, out)
            assert out.removeprefix("s3://runs/") in keys, (stage, out)
    assert "team/exp/digits/results.md" in keys

    # Another node: nothing on its disk. Every stage is found complete in the store, and only the small files
    # the run reads to report (results, tables) are fetched: no checkpoint, no shard.
    shutil.rmtree(tmp_path / "mirror-a")
    monkeypatch.setenv(storage.OBJECT_CACHE_ENV, str(tmp_path / "mirror-b"))
    caplog.set_level(logging.INFO, logger="oal")
    results = registry.run_pipeline(cfg, progress=False)
    assert all(r.skipped for r in results.values()) and len(results) == 10, {k: r.skipped for k, r in results.items()}
    assert caplog.text.count("up to date") == 10
    fetched = sorted(p.name for p in (tmp_path / "mirror-b").rglob("*") if p.is_file())
    assert not [f for f in fetched if f.endswith(".pt")], fetched
    assert Path(results["student"].outputs["checkpoint"]).parent == tmp_path / "mirror-b" / "s3/runs/team/exp/digits/student"
    # and a stage that needs an input the node lacks fetches it from the store
    report = registry.evaluate(cfg, force=True)[1]
    assert (tmp_path / "mirror-b/s3/runs/team/exp/digits/student/checkpoint.pt").is_file()
    assert report is not None and report.id_accuracy == json.loads(
        storage.client().get_object(Bucket="runs", Key="team/exp/digits/eval/results.json")["Body"].read())["id_accuracy"]


def test_a_stage_whose_s3_server_stops_mid_write_is_not_complete_and_resumes(s3, tmp_path, monkeypatch, caplog):
    """The server is paused (SIGSTOP) just before the teacher's second checkpoint (epoch 2) is put: that write is
    in flight when the store stops. The stage fails, the store still holds epoch 1's checkpoint whole and no
    manifest; run again on the same node (whose mirror holds epoch 2's file, which never reached the store), the
    stage resumes from the store's epoch 1."""
    monkeypatch.setenv("OAL_S3_TIMEOUT", "2")
    monkeypatch.setenv("OAL_S3_ATTEMPTS", "1")
    cfg = load_config("digits", [*QUICK, "teacher.epochs=3", "output_dir=s3://runs/stop"])
    puts: list[str] = []

    def pause_before_second_checkpoint(params, **_):
        if params["Key"].endswith("teacher/checkpoint.pt"):
            puts.append(params["Key"])
            if len(puts) == 2:
                s3.proc.send_signal(signal.SIGSTOP)

    event = "before-parameter-build.s3.PutObject"
    storage.client().meta.events.register(event, pause_before_second_checkpoint)
    with pytest.raises(Exception) as failed:
        registry.run_stage("teacher", cfg, progress=False)
    s3.proc.send_signal(signal.SIGCONT)
    storage.client().meta.events.unregister(event, pause_before_second_checkpoint)
    assert len(puts) == 2, f"the second checkpoint was never written: {puts}"
    assert "timeout" in repr(failed.value).lower() or "timed out" in str(failed.value).lower(), repr(failed.value)

    # In the store: epoch 1's checkpoint (whole, readable), no manifest. A node asking the store finds it not done.
    assert _keys("stop/digits/teacher/") == ["stop/digits/teacher/checkpoint.pt"]
    body = storage.client().get_object(Bucket="runs", Key="stop/digits/teacher/checkpoint.pt")["Body"].read()
    (tmp_path / "stored.pt").write_bytes(body)
    import torch

    assert torch.load(tmp_path / "stored.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    local = stages.stage_dir(cfg, "teacher") / "checkpoint.pt"
    assert torch.load(local, map_location="cpu", weights_only=True)["epoch"] == 2  # renamed, never stored
    assert not stages.is_done(stages.stage_dir(cfg, "teacher"), registry.fingerprint("teacher", cfg))

    # Run again on this node: the store's version wins over the mirror's; resumes from epoch 1 and completes.
    caplog.set_level(logging.INFO, logger="oal")
    res = registry.run_stage("teacher", cfg, progress=False)
    assert "(epoch 1)" in caplog.text and "resuming from" in caplog.text
    m = _manifest("stop/digits/teacher/stage.json")
    assert m["resumed_from_epoch"] == 1 and [int(h["epoch"]) for h in m["history"]] == [1, 2, 3]
    assert not res.skipped and stages.is_done(stages.stage_dir(cfg, "teacher"), registry.fingerprint("teacher", cfg))


def test_a_mirror_file_is_the_stores_version_or_nothing(s3, tmp_path):
    """pull/load_torch read the store's version: a replaced object (same size, same second) is fetched again; a
    deleted one leaves no stale mirror file behind to be loaded."""
    path = storage.mirror("s3://runs/v/x.pt")
    storage.save_torch({"v": 1}, path)
    size = path.stat().st_size
    other = tmp_path / "other" / "x.pt"  # torch.save records the file's name: the same name, the same size
    storage.save_torch({"v": 2}, other)
    assert other.stat().st_size == size  # the same size: only the version tells them apart
    storage.client().upload_file(str(other), "runs", "v/x.pt")  # another node writes it
    assert storage.load_torch(path, "test file") == {"v": 2}

    storage.client().delete_object(Bucket="runs", Key="v/x.pt")  # e.g. removed to force a recompute
    with pytest.raises(FileNotFoundError, match=r"test file 's3://runs/v/x\.pt' does not exist"):
        storage.load_torch(path, "test file")
    assert not path.exists()
    assert storage.listing("s3://runs/v") == [] and storage.listing(tmp_path, "*/x.pt") == [other]


def test_missing_bucket_or_refused_credentials_fail_at_once_naming_bucket_and_source(s3, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"bucket 'nope' at http://127\.0\.0\.1:\d+ does not exist .*credentials "
                                         r"from the environment \(AWS_ACCESS_KEY_ID"):
        storage.check_bucket("s3://nope/runs")
    storage.check_bucket("s3://runs/anything")  # the existing bucket passes

    # A server that checks credentials (moto's IAM mode after 5 requests: its start probe and the set-up): a key
    # unknown to it, then a user that may read the bucket but not write to it
    strict = S3Server(tmp_path, {"INITIAL_NO_AUTH_ACTION_COUNT": "5"})
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", strict.endpoint)
        import boto3

        storage.client().create_bucket(Bucket="locked")
        iam = boto3.client("iam", endpoint_url=strict.endpoint)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                                                   {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        with pytest.raises(ValueError, match=r"bucket 'locked' .* refused credentials from the environment .*"
                                             r"\((403|InvalidAccessKeyId) on HeadBucket\)"):
            storage.check_bucket("s3://locked/runs")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        storage.client().head_bucket(Bucket="locked")  # it may read
        with pytest.raises(ValueError, match=r"bucket 'locked' .* refused credentials from the environment .*"
                                             r"\(AccessDenied on PutObject\)"):
            storage.check_bucket("s3://locked/runs")
    finally:
        strict.stop()


def test_the_cli_reports_a_missing_bucket_before_any_stage(s3, tmp_path):
    r = subprocess.run([sys.executable, "-m", "oal", "pipeline", "--config", "digits", *QUICK,
                        "output_dir=s3://absent-bucket/x"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("oal: storage error: output_dir 's3://absent-bucket/x': "
                                                        "bucket 'absent-bucket'"), r.stderr[-2000:]


def test_mirror_paths_map_to_uris_and_back(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.OBJECT_CACHE_ENV, str(tmp_path / "m"))
    p = storage.mirror("s3://b/run/x")
    assert p == tmp_path / "m" / "s3" / "b" / "run" / "x"
    assert storage.remote(p / "stage.json") == ("b", "run/x/stage.json")
    assert storage.uri(p / "stage.json") == "s3://b/run/x/stage.json"
    assert storage.local("s3://b/run/x/stage.json") == p / "stage.json"
    assert storage.remote(tmp_path / "elsewhere" / "f") is None and storage.uri("/data/f") == "/data/f"
    with pytest.raises(ValueError, match="expected s3://bucket/prefix"):
        storage.mirror("gs://b/x")


def test_a_trials_checkpoints_and_a_best_config_are_found_in_the_store(s3, tmp_path):
    """With Ray's storage in the bucket, a tune trial that ASHA stopped has its checkpoints only there:
    `jobs.evaluate` lists them in the store. A config naming an s3 run's file by its mirror path (as
    tune/best.yaml does) is accepted on a node that never fetched it, and only if the store holds it."""
    from jobs.evaluate import resolve
    from oal.config import ConfigError, absolute_paths

    cfg = load_config("digits", [*QUICK, "output_dir=s3://runs/t"])
    run = "t/digits-trial-abc/ray/digits-trial-abc-student"
    for i in (1, 2):
        storage.client().put_object(Bucket="runs", Key=f"{run}/checkpoint_00000{i}/checkpoint.pt", Body=b"%d" % i)
    path, label = resolve(cfg, None, "abc")
    assert path == storage.mirror(f"s3://runs/{run}/checkpoint_000002/checkpoint.pt") and label == "trial-abc"
    assert path.read_bytes() == b"2"  # fetched
    assert resolve(cfg, f"s3://runs/{run}", None)[0] == path  # --checkpoint: the Ray Train run folder's URI
    with pytest.raises(FileNotFoundError, match="trial 'zzz' has no checkpoint"):
        resolve(cfg, None, "zzz")

    shutil.rmtree(storage.cache_root())
    got = absolute_paths(load_config("digits", [f"teacher.checkpoint={path}"]))
    assert got.teacher.checkpoint == str(path) and not path.exists()
    with pytest.raises(ConfigError, match="teacher.checkpoint' is .* which does not exist"):
        absolute_paths(load_config("digits", [f"teacher.checkpoint={path.parent.parent}/checkpoint_9/x.pt"]))
    # a mirror copy of an object that is gone does not count
    storage.pull(path)
    storage.client().delete_object(Bucket="runs", Key=f"{run}/checkpoint_000002/checkpoint.pt")
    assert path.is_file()
    with pytest.raises(ConfigError, match="teacher.checkpoint' is .* which does not exist"):
        absolute_paths(load_config("digits", [f"teacher.checkpoint={path}"]))


def test_metrics_buffered_on_a_worker_reach_the_store(s3, tmp_path, monkeypatch):
    """MLflow down: a stage's buffered metric lines (tracking_buffer.jsonl) are put into the store, not left on
    the worker's disk; a later append on another node continues the store's file."""
    import socket

    import mlflow

    from oal.tracking import MetricLogger

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", "http://127.0.0.1:1")
    buf = storage.mirror("s3://runs/m/digits/teacher/tracking_buffer.jsonl")
    MetricLogger("0123456789abcdef", buf, dead).log({"loss": 0.5}, step=1)
    monkeypatch.setenv(storage.OBJECT_CACHE_ENV, str(tmp_path / "mirror-b"))  # another node
    other = storage.mirror("s3://runs/m/digits/teacher/tracking_buffer.jsonl")
    assert other != buf and not other.exists()
    MetricLogger("0123456789abcdef", other, dead).log({"loss": 0.25}, step=2)
    rows = [json.loads(x) for x in storage.read_text("s3://runs/m/digits/teacher/tracking_buffer.jsonl").splitlines()]
    assert [(r["step"], r["metrics"]) for r in rows] == [(1, {"loss": 0.5}), (2, {"loss": 0.25})]
