"""MLflow tracking against the session's real MLflow server (SQLite store, artifacts proxied to the real
S3 server on loopback), after one real pipeline run on the real Ray head; then the UI in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import sqlite3
import struct
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import QUICK

pytestmark = [pytest.mark.stack, pytest.mark.ray, pytest.mark.slow]
SENTINEL = "SENTINEL-secret-9f3b1c"
# The diffusion stage too: the built-in model trained on the ID images, one epoch per phase
LDM = ("diffusion.model=builtin-ldm", "ldm.vae_epochs=1", "ldm.epochs=1", "ldm.eval_samples=2", "ldm.grid_per_class=2")
# One teacher and one base epoch: no check here counts theirs (the student's two epochs are counted)
ONE_EPOCH = ("teacher.epochs=1", "base.epochs=1")
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
        cfg = load_config("digits", [*QUICK, *ONE_EPOCH, f"output_dir={out}", "name=tracked", "tracking.experiment=oal-test",
                          "eval.plots=true", "eval.baseline=true", "cluster.shards=2", *LDM])
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
                         "eval_base", "eval", "detector"}
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


def test_every_computing_stage_ran_in_a_ray_worker_and_equals_the_single_process_one(tracked_run, tmp_path):
    """The pipeline's driver (this test process) only orchestrated: each stage's manifest was written by another
    process, the one that computed it; embeddings, k-NN and evaluation ran as two shards. The outputs are the
    single-process commands' (same inputs, same seed)."""
    import torch

    from oal import registry, stages
    from oal.config import load_config
    from oal.storage import load_torch

    run = tracked_run["out"] / "tracked"
    writers = {d.name: json.loads((d / "stage.json").read_text())["written_by"] for d in run.iterdir()
               if (d / "stage.json").is_file()}
    assert set(writers) == {"base", "teacher", "diffusion", "embeddings", "anchors", "knn", "latents", "student",
                            "eval_base", "eval", "detector"}
    assert all(w["pid"] != os.getpid() for w in writers.values()), writers
    # embeddings and both evaluations (their data) and k-NN (its classes) were split over two Ray tasks
    # (cluster.shards=2), merged in a third
    for name in ("embeddings", "knn", "eval_base", "eval"):
        shards = json.loads((run / name / "stage.json").read_text())["shards"]
        assert len(shards) == 2 and all(s["pid"] != os.getpid() for s in shards), (name, shards)
    # the same stages in this process, from the Ray run's teacher, diffusion model and students
    cfg = load_config("digits", [*QUICK, *ONE_EPOCH, f"output_dir={tmp_path}", "name=local", "eval.plots=false",
                                 "eval.baseline=true", *LDM, f"teacher.checkpoint={run / 'teacher/checkpoint.pt'}",
                                 f"diffusion.checkpoint={run / 'diffusion/checkpoint.pt'}"])
    for stage, file, key in (("embeddings", "id_embeddings.pt", "embeddings"), ("anchors", "anchors.pt", "anchors"),
                             ("knn", "knn_outliers.pt", "outliers")):
        res = registry.run_stage(stage, cfg)
        assert json.loads((res.dir / "stage.json").read_text())["written_by"]["pid"] == os.getpid()
        mine, ray_ = (load_torch(d / stage / file, stage)[key] for d in (tmp_path / "local", run))
        assert torch.allclose(mine, ray_, rtol=1e-5, atol=1e-6), stage
    for of, ckpt in (("student", run / "student/checkpoint.pt"), ("base", run / "base/checkpoint.pt")):
        res, _ = registry.evaluate(cfg, str(ckpt), of=of)
        mine = json.loads((res.dir / "results.json").read_text())
        ray_ = json.loads((run / stages.EVAL_DIRS[of] / "results.json").read_text())
        assert mine["id_accuracy"] == ray_["id_accuracy"]
        for pp in ray_["results"]:
            for split in ("near", "far"):
                assert mine["results"][pp][split]["auroc"] == pytest.approx(ray_["results"][pp][split]["auroc"],
                                                                              abs=1e-6), (of, pp, split)


def test_artifacts_are_in_s3(tracked_run, stack):
    import boto3
    from mlflow.tracking import MlflowClient

    kids = _children(tracked_run)
    client = MlflowClient()
    names = {f.path for f in client.list_artifacts(kids["eval"].info.run_id)}
    assert {"results.md", "results.json", "plots", "stage.json", "config.yaml"} <= names
    assert {f.path for f in client.list_artifacts(kids["latents"].info.run_id)} >= {"manifest.json", "grid.png"}
    assert kids["latents"].data.tags["oal.folder"].endswith("latents")  # its shards: referenced, not copied
    s3 = boto3.client("s3", endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.env["OAL_S3_BUCKET"]).get("Contents", [])]
    eval_id = kids["eval"].info.run_id
    assert any(k.endswith(f"{eval_id}/artifacts/results.md") for k in keys)
    assert any(k.endswith(f"{eval_id}/artifacts/plots/ebo_noise.png") for k in keys)
    import mlflow

    models = mlflow.search_logged_models(experiment_ids=[tracked_run["exp"].experiment_id], output_format="list")
    student = [m for m in models if m.name == "student"]
    assert len(student) == 1
    # the evaluation's metrics are the model's (MLflow would also link them if logged before it: this checks the link)
    linked = {m.key: m.value for m in student[0].metrics}
    assert linked["id_accuracy"] == pytest.approx(kids["eval"].data.metrics["id_accuracy"])
    # (the system-metrics sampler's host figures may be linked too when a sample falls after the model's logging)
    ours = lambda keys: {k for k in keys if not k.startswith("system/")}  # noqa: E731
    assert ours(linked) == ours(kids["eval"].data.metrics)
    assert len(linked) > 20
    # its requirements are named (MLflow's inference not run), pinned to this environment's versions
    reqs = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{student[0].model_id}")).read_text().split()
    assert f"torch=={version('torch').split('+')[0]}" in reqs and any(r.startswith("oal==") for r in reqs)


def test_no_secret_reaches_mlflow_s3_or_logs(tracked_run, stack):
    """The jobs' MLflow password lives in every process of the run (the driver here; the Ray head passes it to
    every worker), the admin password and the UI's key in the MLflow server's, the sentinel S3 secret in the
    driver's: none of them may appear in MLflow's stores, S3, the run folder, the stack's logs, Ray's session logs
    (workers, raylet, GCS, dashboard) or a job's log."""
    import boto3
    from ray.job_submission import JobSubmissionClient

    secrets = {SENTINEL, stack.env["MLFLOW_TRACKING_PASSWORD"], stack.stack.secret("admin"),
               stack.stack.secret("flask")}
    assert all(len(x) >= 20 for x in secrets) and len(secrets) == 4

    def clean(text: str | bytes, where: object) -> None:
        raw = text if isinstance(text, bytes) else text.encode(errors="ignore")
        for secret in secrets:
            assert secret.encode() not in raw, f"a secret appears in {where}"

    scanned = 0
    for db in (Path(stack.state_dir) / "mlflow.db", Path(stack.state_dir) / "mlflow_auth.db"):
        con = sqlite3.connect(db)
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            for row in con.execute(f'SELECT * FROM "{table}"'):
                clean(repr(row), f"{db.name}:{table}")
                scanned += 1
    s3 = boto3.client("s3", endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"])
    bucket = stack.env["OAL_S3_BUCKET"]
    objects = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert objects
    for o in objects:
        clean(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read(), o["Key"])
    files = [f for f in tracked_run["out"].rglob("*") if f.is_file() and f.suffix in
             (".json", ".yaml", ".md", ".log", ".jsonl", ".txt")]
    files += list((Path(stack.state_dir) / "logs").rglob("*.log"))
    ray_logs = [f for f in Path(stack.stack.ray_temp_dir).glob("session_*/logs/**/*") if f.is_file()]
    assert len(ray_logs) > 10 and any("worker" in f.name for f in ray_logs)
    for f in files + ray_logs:
        clean(f.read_bytes(), f)
    client = JobSubmissionClient(stack.env["RAY_API_SERVER_ADDRESS"])
    for job in client.list_jobs():
        if job.submission_id:
            clean(client.get_job_logs(job.submission_id), f"the log of job {job.submission_id}")
    assert scanned > 100 and len(files) > 10


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is required for the UI check: `apt-get install chromium` (.ci/run does)")
    return exe


async def _devtools(url: str, tmp: Path, login: tuple[str, str] | None, ready: Callable[[str], bool],
                    screenshot: Path | None, timeout: float) -> str:
    """Open `url` in headless Chromium over the DevTools protocol; with `login`, every request carries the user's
    basic-auth credentials (what the browser sends once a user has logged in). Waits until `ready(html)` or
    `timeout`, then returns the page's HTML and writes a 1400x900 PNG screenshot."""
    import aiohttp

    proc = await asyncio.create_subprocess_exec(
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp}",
        "--remote-debugging-port=0", "about:blank", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        ws_url = ""
        while not ws_url:
            line = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert line, "Chromium exited before its DevTools endpoint came up"
            m = re.search(rb"DevTools listening on (ws://\S+)", line)
            ws_url = m.group(1).decode() if m else ""
        drain = asyncio.create_task(proc.stderr.read())  # a full stderr pipe would stall the browser
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
            ids = itertools.count(1)

            async def call(method: str, params: dict | None = None, session: str | None = None) -> dict:
                i = next(ids)
                await ws.send_json({"id": i, "method": method, "params": params or {},
                                    **({"sessionId": session} if session else {})})
                async for msg in ws:  # events in between are not needed
                    data = json.loads(msg.data)
                    if data.get("id") == i:
                        assert "error" not in data, f"{method}: {data['error']}"
                        return data["result"]
                raise AssertionError(f"the DevTools connection closed during {method}")

            target = (await call("Target.createTarget", {"url": "about:blank"}))["targetId"]
            sid = (await call("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
            await call("Emulation.setDeviceMetricsOverride",
                       {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False}, sid)
            await call("Network.enable", {}, sid)
            if login is not None:
                token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
                await call("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}, sid)
            await call("Page.navigate", {"url": url}, sid)
            deadline = time.monotonic() + timeout
            while True:
                await asyncio.sleep(0.5)
                got = await call("Runtime.evaluate", {"expression": "document.documentElement.outerHTML",
                                                      "returnByValue": True}, sid)
                html = str(got["result"].get("value", ""))
                if ready(html) or time.monotonic() > deadline:
                    break
            await asyncio.sleep(1.0)  # let the table finish drawing before the screenshot
            if screenshot is not None:
                shot = await call("Page.captureScreenshot", {"format": "png"}, sid)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            html = str((await call("Runtime.evaluate", {"expression": "document.documentElement.outerHTML",
                                                        "returnByValue": True}, sid))["result"].get("value", ""))
        drain.cancel()
        return html
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _browse(url: str, tmp: Path, login: tuple[str, str] | None, ready: Callable[[str], bool],
            screenshot: Path | None = None, timeout: float = 60) -> str:
    return asyncio.run(_devtools(url, tmp, login, ready, screenshot, timeout))


def _check_png(path: Path, since: float) -> None:
    """A screenshot this test wrote: a PNG of 1400x900, of real content (not a blank page), newer than `since`."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (1400, 900), (path, width, height)
    assert len(data) > 30_000, f"{path}: {len(data)} bytes, a blank page is a few KB"
    assert path.stat().st_mtime >= since


def test_mlflow_ui_in_headless_chromium(tracked_run, stack, tmp_path):
    """The UI behind MLflow's login: nothing for an anonymous browser; the runs and a metric for the jobs' user.
    Screenshots go to tmp_path (OAL_UPDATE_SCREENSHOTS=1 also copies them to docs/, for the README)."""
    base = stack.env["MLFLOW_TRACKING_URI"].rstrip("/")
    login = (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    exp_id = tracked_run["exp"].experiment_id
    t0 = time.time() - 1
    runs_url = f"{base}/#/experiments/{exp_id}/runs"
    anonymous = _browse(runs_url, tmp_path / "anon", None, lambda h: False, timeout=5)
    assert "tracked-pipeline" not in anonymous and "eval" not in anonymous
    shots = {"experiment": tmp_path / "mlflow-experiment.png", "run": tmp_path / "mlflow-run.png"}
    dom = _browse(runs_url, tmp_path / "a", login, lambda h: "tracked-pipeline" in h, shots["experiment"])
    assert "tracked-pipeline" in dom
    eval_run = _children(tracked_run)["eval"]
    value = eval_run.data.metrics["ebo_near_auroc"]
    shown = {f"{value:.{k}f}" for k in range(3, 7)} | {str(value), f"{value:.4g}"}
    dom = _browse(f"{base}/#/experiments/{exp_id}/runs/{eval_run.info.run_id}", tmp_path / "b", login,
                  lambda h: any(v in h for v in shown), shots["run"])
    assert "eval" in dom
    assert any(v in dom for v in shown), f"the run page shows none of {shown}"
    for shot in shots.values():
        _check_png(shot, t0)
    if os.environ.get("OAL_UPDATE_SCREENSHOTS") == "1":
        for shot in shots.values():
            shutil.copyfile(shot, DOCS / shot.name)


def test_jobs_evaluate_scores_a_checkpoint_on_a_worker_tracked_in_mlflow(tracked_run):
    """`python -m jobs.evaluate` on the pipeline's student: the same numbers as the pipeline's evaluation,
    computed in a Ray worker, recorded as an MLflow run of kind "evaluate"; a second call is skipped."""
    import mlflow

    from jobs import evaluate
    from oal.config import load_config

    run = tracked_run["out"] / "tracked"
    cfg = load_config("digits", [*QUICK, *ONE_EPOCH, f"output_dir={tracked_run['out']}", "name=tracked",
                                 "tracking.experiment=oal-test", "eval.plots=true", *LDM])
    result, path = evaluate.run(cfg, checkpoint=str(run / "student"))  # a stage folder: its checkpoint.pt
    assert path == run / "student" / "checkpoint.pt" and not result.skipped
    assert result.dir == run / "evaluations" / "student-checkpoint"
    manifest = json.loads((result.dir / "stage.json").read_text())
    assert manifest["written_by"]["pid"] != os.getpid()
    mine = json.loads((result.dir / "results.json").read_text())
    pipeline_eval = json.loads((run / "eval" / "results.json").read_text())
    assert mine["results"]["ebo"] == pipeline_eval["results"]["ebo"]
    runs = mlflow.search_runs([tracked_run["exp"].experiment_id], filter_string="tags.`oal.kind` = 'evaluate'",
                              output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    kids = mlflow.search_runs([tracked_run["exp"].experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{runs[0].info.run_id}'", output_format="list")
    assert [k.info.run_name for k in kids] == ["eval"]
    assert kids[0].data.metrics["ebo_near_auroc"] == pytest.approx(pipeline_eval["results"]["ebo"]["near"]["auroc"])
    again, _ = evaluate.run(cfg, checkpoint=str(run / "student" / "checkpoint.pt"))
    assert again.skipped


def _png(arr) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _post(url: str, images: list[bytes]) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    body = json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(b).decode()] for b in images]}}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_detector_is_registered_and_served(tracked_run, tmp_path):
    """models:/oal-tracked@candidate, served by a real `mlflow models serve`, flags the ID test images and the
    near-OOD images in the shares the detector stage recorded, answers as the packaged detector does in-process,
    and answers a bad request with an error while staying up."""
    import subprocess
    import sys
    import urllib.request

    import numpy as np
    from mlflow.tracking import MlflowClient

    from oal.data import build_benchmark
    from oal.detector import Detector
    from tests.stack_fixtures import free_ports

    version = MlflowClient().get_model_version_by_alias("oal-tracked", "candidate")
    det_run = _children(tracked_run)["detector"]
    assert version.run_id == det_run.info.run_id
    manifest = json.loads((tracked_run["out"] / "tracked" / "detector" / "stage.json").read_text())
    assert det_run.data.tags["oal.score"] == manifest["score"]
    assert float(det_run.data.tags["oal.threshold"]) == pytest.approx(manifest["threshold"], rel=1e-5)
    assert det_run.data.metrics["threshold"] == pytest.approx(manifest["threshold"])

    port = free_ports(1)[0]
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([mlflow_bin, "models", "serve", "-m", "models:/oal-tracked@candidate", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], stdout=log, stderr=log,
                              # mlflow starts uvicorn by name: the environment's bin folder on PATH, as when activated
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]),
                                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        bench = build_benchmark(_data_cfg(tracked_run))
        to_png = lambda ds: [_png((ds.tensors[0][i, 0] * 127.5 + 127.5).round().clamp(0, 255).byte().numpy())
                             for i in range(len(ds))]  # noqa: E731
        id_imgs, near_imgs = to_png(bench.test), to_png(bench.near["digits678"])
        status, answer = _post(url + "/invocations", id_imgs + near_imgs)
        assert status == 200, answer
        rows = answer["predictions"]
        assert len(rows) == len(id_imgs) + len(near_imgs)
        local = Detector.load(tracked_run["out"] / "tracked" / "detector" / "model").predict(id_imgs + near_imgs)
        assert [r["is_ood"] for r in rows] == local["is_ood"] and [r["label"] for r in rows] == local["label"]
        assert [r["ood_score"] for r in rows] == pytest.approx(local["ood_score"], abs=1e-5)
        for imgs, got, key in ((id_imgs, rows[: len(id_imgs)], "id_flagged"),
                               (near_imgs, rows[len(id_imgs):], "flagged:digits678")):
            p, n = manifest["test"][key], len(imgs)
            share = float(np.mean([r["is_ood"] for r in got]))
            # the recorded share at that threshold, within the sampling error of n images (and 8-bit rounding)
            assert abs(share - p) <= 3 * (p * (1 - p) / n) ** 0.5 + 3 / n, (key, share, p)
        status, answer = _post(url + "/invocations", [b"not an image at all"])
        assert status == 400 and "not a PNG or JPEG" in json.dumps(answer)
        status, _ = _post(url + "/invocations", id_imgs[:3])  # still up
        assert status == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _data_cfg(tracked_run):
    from oal.config import load_config

    return load_config("digits", [*QUICK, f"output_dir={tracked_run['out']}", "name=tracked"]).data


def test_batch_scoring_job_on_ray_data(tracked_run, stack, tmp_path):
    """`python -m jobs.score` submitted as a Ray job over 601 images in the local S3 server (batches of 100 over 2
    actors), one of them corrupt: one parquet row per file, equal to the packaged detector's answers in-process
    (which the served model's equal, above), the corrupt file a row with its error; the MLflow run holds the counts."""
    import io

    import boto3
    import mlflow
    import numpy as np
    import pandas as pd
    from ray.job_submission import JobStatus, JobSubmissionClient
    from sklearn.datasets import load_digits

    from oal.detector import Detector
    from tests.stack_fixtures import wait_job

    bucket, prefix = stack.env["OAL_S3_BUCKET"], f"score-{tmp_path.name}"
    s3 = boto3.client("s3", endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"])
    digits = (load_digits().images[:400] * 255 / 16).round().astype(np.uint8)  # (400, 8, 8)
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 8, 8), dtype=np.uint8)
    images = {f"{prefix}/in/{kind}/{i:05d}.png": _png(a) for kind, arr in (("digit", digits), ("noise", noise))
              for i, a in enumerate(arr)}
    images[f"{prefix}/in/noise/zz-corrupt.png"] = b"\x89PNG but cut short"
    assert len(images) == 601
    for key, body in images.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/in/README.txt", Body=b"not an image: left out")

    client = JobSubmissionClient(stack.env["RAY_API_SERVER_ADDRESS"])
    out = f"s3://{bucket}/{prefix}/out/scores.parquet"
    job = client.submit_job(
        entrypoint=f"python -m jobs.score --model models:/oal-tracked@candidate --input s3://{bucket}/{prefix}/in/ "
                   f"--output {out} --actors 2 --batch-size 100",
        runtime_env={"working_dir": str(Path(__file__).parents[1]), "excludes": [".venv", ".git", "runs", ".stack"],
                     "env_vars": {"OAL_OBJECT_CACHE": str(tmp_path / "mirror"), "OAL_SCORE_EXPERIMENT": "oal-test-score"}})
    status = wait_job(client, job, timeout=480)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "601 images" in logs and "1 unreadable" in logs

    table = pd.read_parquet(io.BytesIO(s3.get_object(Bucket=bucket, Key=f"{prefix}/out/scores.parquet")["Body"].read()))
    assert len(table) == 601 and list(table["path"]) == sorted(f"s3://{bucket}/{k}" for k in images)
    bad = table[table["error"].notna()]
    assert list(bad["path"]) == [f"s3://{bucket}/{prefix}/in/noise/zz-corrupt.png"]
    assert "not a PNG or JPEG" in bad["error"].iloc[0]
    assert bad["label"].isna().all()
    good = table[table["error"].isna()]
    local = Detector.load(tracked_run["out"] / "tracked" / "detector" / "model").predict(
        [images[p.split(f"s3://{bucket}/", 1)[1]] for p in good["path"]])
    assert list(good["is_ood"].astype(bool)) == local["is_ood"] and list(good["label"].astype(int)) == local["label"]
    assert list(good["class_name"]) == local["class_name"]
    assert good["ood_score"].tolist() == pytest.approx(local["ood_score"], abs=1e-5)

    exp = mlflow.get_experiment_by_name("oal-test-score")
    run = mlflow.search_runs([exp.experiment_id], filter_string="tags.`oal.kind` = 'score'", output_format="list")[0]
    m = run.data.metrics
    assert (m["images"], m["errors"], m["other_files"]) == (601, 1, 1)
    assert m["flagged"] == int(good["is_ood"].astype(bool).sum()) and m["images_per_second"] > 0
    assert run.data.tags["oal.model"] == "models:/oal-tracked@candidate"


def test_a_stage_added_by_one_registry_entry_runs_through_ray_job_submit_tracked(tracked_run, stack, tmp_path):
    """tests/stage_job.py (one `Stage` placed after the embeddings stage; no other code changed) submitted with
    the tracked run's config onto a copy of its folder: every stage of the run is skipped as up to date, the new
    one computed in a Ray worker, and tracked as a child run of its own with its manifest and config."""
    import shlex

    import mlflow
    from ray.job_submission import JobStatus, JobSubmissionClient

    from tests.stack_fixtures import wait_job

    shutil.copytree(tracked_run["out"] / "tracked", tmp_path / "tracked")
    overrides = [*QUICK, *ONE_EPOCH, f"output_dir={tmp_path}", "name=tracked", "tracking.experiment=oal-test-stage",
                 "eval.plots=true", "eval.baseline=true", "cluster.shards=2", *LDM]  # tracked_run's, less the experiment
    client = JobSubmissionClient(stack.env["RAY_API_SERVER_ADDRESS"])
    job = client.submit_job(
        entrypoint="python -m tests.stage_job --no-progress --config digits " + shlex.join(overrides),
        runtime_env={"working_dir": str(Path(__file__).parents[1]), "excludes": [".venv", ".git", "runs", ".stack"],
                     "env_vars": {"OAL_OBJECT_CACHE": str(tmp_path / "mirror")}})
    status = wait_job(client, job, timeout=300)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    said = dict(re.findall(r"^\[(\w+)\] (done|skipped)", logs, re.M))
    assert said == {**{s: "skipped" for s in ("base", "teacher", "diffusion", "embeddings", "anchors", "knn", "latents",
                                              "student", "eval_base", "eval", "detector")}, "feature_stats": "done"}
    manifest = json.loads((tmp_path / "tracked" / "feature_stats" / "stage.json").read_text())
    assert manifest["classes"] == 6 and manifest["written_by"]["pid"] != os.getpid() and manifest["written_by"]["node"]
    exp = mlflow.get_experiment_by_name("oal-test-stage")
    parent = mlflow.search_runs([exp.experiment_id], filter_string="tags.`oal.kind` = 'pipeline'", output_format="list")
    kids = _children({"exp": exp, "parent": parent[0]})
    assert len(parent) == 1 and kids["feature_stats"].info.status == "FINISHED"
    assert kids["feature_stats"].data.tags["oal.skipped"] == "false" and kids["teacher"].data.tags["oal.skipped"] == "true"
    assert kids["feature_stats"].data.params["fingerprint"] == manifest["fingerprint"]
    names = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(kids["feature_stats"].info.run_id)}
    # tracking names no stage: the stage's viewable output and its declared figure are logged, its tensors not
    assert names == {"stage.json", "config.yaml", "summary.json"}
    assert kids["feature_stats"].data.metrics["mean_feature_norm"] == pytest.approx(manifest["metrics"]["mean_feature_norm"])
