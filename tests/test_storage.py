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

from oal import stages, storage
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
    stages.run_pipeline(cfg, progress=False)

    keys = _keys("team/exp/digits/")
    for stage in ("base", "teacher", "embeddings", "anchors", "knn", "latents", "student", "eval_base", "eval"):
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
    results = stages.run_pipeline(cfg, progress=False)
    assert all(r.skipped for r in results.values()) and len(results) == 9, {k: r.skipped for k, r in results.items()}
    assert caplog.text.count("up to date") == 9
    fetched = sorted(p.name for p in (tmp_path / "mirror-b").rglob("*") if p.is_file())
    assert not [f for f in fetched if f.endswith(".pt")], fetched
    assert Path(results["student"].outputs["checkpoint"]).parent == tmp_path / "mirror-b" / "s3/runs/team/exp/digits/student"
    # and a stage that needs an input the node lacks fetches it from the store
    report = stages.run_evaluate(cfg, force=True)[1]
    assert (tmp_path / "mirror-b/s3/runs/team/exp/digits/student/checkpoint.pt").is_file()
    assert report is not None and report.id_accuracy == json.loads(
        storage.client().get_object(Bucket="runs", Key="team/exp/digits/eval/results.json")["Body"].read())["id_accuracy"]


def test_a_stage_whose_s3_server_stops_mid_write_is_not_complete_and_resumes(s3, tmp_path, monkeypatch, caplog):
    """The server is paused (SIGSTOP) right after the teacher's first checkpoint object is written: the stage
    fails, no manifest exists, and the stage run again resumes from that checkpoint, read back from the store."""
    monkeypatch.setenv("OAL_S3_TIMEOUT", "2")
    monkeypatch.setenv("OAL_S3_ATTEMPTS", "1")
    cfg = load_config("digits", [*QUICK, "teacher.epochs=3", "output_dir=s3://runs/stop"])
    paused = []

    def pause_after_first_put(**_):
        if not paused:
            paused.append(time.time())
            s3.proc.send_signal(signal.SIGSTOP)

    storage.client().meta.events.register("after-call.s3.PutObject", pause_after_first_put)
    with pytest.raises(Exception) as failed:
        stages.run_teacher(cfg, progress=False)
    assert paused, "the server was never paused: no object was written"
    s3.proc.send_signal(signal.SIGCONT)
    storage.client().meta.events.unregister("after-call.s3.PutObject", pause_after_first_put)
    assert "timeout" in repr(failed.value).lower() or "timed out" in str(failed.value).lower(), repr(failed.value)

    # In the store: the first checkpoint (whole), no manifest. A node asking the store finds the stage not done.
    assert _keys("stop/digits/teacher/") == ["stop/digits/teacher/checkpoint.pt"]
    assert not stages.is_done(stages.stage_dir(cfg, "teacher"), stages.teacher_fp(cfg))

    # Run again on another node (empty mirror): it resumes from the stored epoch-1 checkpoint and completes.
    monkeypatch.setenv(storage.OBJECT_CACHE_ENV, str(tmp_path / "mirror-b"))
    caplog.set_level(logging.INFO, logger="oal")
    res = stages.run_teacher(cfg, progress=False)
    assert "(epoch 1)" in caplog.text and "resuming from" in caplog.text
    m = _manifest("stop/digits/teacher/stage.json")
    assert m["resumed_from_epoch"] == 1 and [int(h["epoch"]) for h in m["history"]] == [1, 2, 3]
    assert not res.skipped and stages.is_done(stages.stage_dir(cfg, "teacher"), stages.teacher_fp(cfg))


def test_missing_bucket_or_refused_credentials_fail_at_once_naming_bucket_and_source(s3, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"bucket 'nope' at http://127\.0\.0\.1:\d+ does not exist .*credentials "
                                         r"from the environment \(AWS_ACCESS_KEY_ID"):
        storage.check_bucket("s3://nope/runs")
    storage.check_bucket("s3://runs/anything")  # the existing bucket passes

    # A server that checks credentials (moto's IAM mode from its first request): this key is unknown to it
    strict = S3Server(tmp_path, {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", strict.endpoint)
        with pytest.raises(ValueError, match=r"bucket 'locked' .* refused credentials from the environment .*"
                                             r"\((403|InvalidAccessKeyId)\)"):
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
    assert not list(tmp_path.rglob("stage.json"))


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
