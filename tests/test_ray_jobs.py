"""The jobs on the session's real local Ray head (token auth on): distributed training, the actor pool, and faults
(a killed actor, a killed worker). The pipeline through `ray job submit`, stopped and resubmitted: test_two_nodes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import QUICK

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def ray_driver(ray_head):
    import ray

    ours = not ray.is_initialized()  # a driver another test module left connected joined the same head
    if ours:
        ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    yield ray
    if ours:
        ray.shutdown()


def _cfg(tmp_path, *extra):
    from oal.config import load_config

    return load_config("digits", [*QUICK, f"output_dir={tmp_path}", *extra])


def _kill_when(predicate, class_name: str, timeout: float = 240, busy_in: str | None = None) -> threading.Thread:
    """In the background: once `predicate()` holds, SIGKILL one live actor of `class_name`; with `busy_in`, one that
    is running that method (Ray's process title `ray::<class>.<method>`), waiting for one if none is: an actor
    still in its constructor is ALIVE too (a slow model load), and killing it exercises another path. The busy
    actor is found by its process title, not through Ray's state API: a list_actors call took long enough under
    load for a fast pool to finish its last shards first (seen: no actor killed)."""
    import psutil
    from ray.util.state import list_actors

    result: dict = {}

    def candidates() -> list[int]:
        if busy_in is None:
            return [a["pid"] for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])]
        title = f"ray::{class_name}.{busy_in}"
        return [p.pid for p in psutil.process_iter(["cmdline"]) if title in " ".join(p.info["cmdline"] or [])]

    def run():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate() and (chosen := candidates()):
                os.kill(chosen[0], signal.SIGKILL)
                result["pid"] = chosen[0]
                return
            time.sleep(0.05 if busy_in else 0.2)

    t = threading.Thread(target=run, daemon=True)
    t.result = result  # type: ignore[attr-defined]
    t.start()
    return t


def _two_rank_loop(config):
    import ray.train
    from torch.utils.data import TensorDataset

    from oal.config import LossConfig, TrainConfig
    from oal.losses import OALLoss
    from oal.models import build_student
    from oal.train import Loop, OALTerms, fit, make_accelerator

    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    teacher = build_student("resnet_tiny", 3)  # the same frozen teacher on both ranks
    torch.manual_seed(100 + rank)  # different initial weights on purpose: DDP must broadcast rank 0's
    net = build_student("resnet_tiny", 3)
    # KD through the DT projector (BatchNorm1d); 66 images: 33 per rank, so the last per-rank batch of 8 holds one
    loss = OALLoss(LossConfig(w_micl_knn=0, w_micl_lat=0), net.feature_dim, teacher.feature_dim)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(66, 3, 8, 8, generator=g), torch.arange(66) % 3)
    cfg = TrainConfig(epochs=1, lr=0.1)
    acc = make_accelerator("cpu", cfg)
    fit(net, data, cfg, Path(config["out"]) / f"rank{rank}",
        Loop(batch_size=8, seed=0, accelerator=acc, progress=False),
        OALTerms(loss=loss, teacher=teacher))
    params = {k: v.detach() for k, v in net.named_parameters()}
    # BatchNorm statistics: recomputed after the epoch on each rank's share of the images, then averaged.
    stats = {k: v for k, v in net.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    torch.save({"world": acc.num_processes, "state": params, "stats": stats}, Path(config["out"]) / f"weights{rank}.pt")
    ray.train.report({"done": 1})


def test_two_gloo_workers_hold_equal_weights(ray_driver, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(_two_rank_loop, train_loop_config={"out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                 run_config=RunConfig(name="equal-weights", storage_path=str(tmp_path / "ray"))).fit()
    w0 = torch.load(tmp_path / "weights0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights1.pt", weights_only=True)
    assert w0["world"] == w1["world"] == 2  # Accelerate joined Ray's gloo group
    trained = 0
    for (k, a), b in zip(w0["state"].items(), w1["state"].values()):
        assert torch.allclose(a, b, atol=1e-6), k
        trained += 1
    assert trained > 10
    assert len(w0["stats"]) > 4 and all(torch.allclose(a, w1["stats"][k], atol=1e-6) for k, a in w0["stats"].items())
    # and training moved them away from rank 1's own (different) initialisation
    torch.manual_seed(101)
    from oal.models import build_student

    init1 = dict(build_student("resnet_tiny", 3).named_parameters())
    assert not torch.allclose(init1["fc.weight"], w1["state"]["fc.weight"])


def test_killed_synthesis_actor_loses_and_duplicates_nothing(ray_driver, tmp_path):
    from jobs.synthesize import run_pool
    from oal.synthesize import LatentSynthesizer, plan_shards

    cfg = _cfg(tmp_path, "diffusion.num_outliers=24", "diffusion.shard_size=3", "diffusion.steps=8",
               "cluster.synth_actors=2")
    names = ["zero", "one", "two"]
    outliers = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "latents"
    # an actor computing a shard (seen flaky when the one killed was still loading its model: nothing requeued)
    killer = _kill_when(lambda: len(list(out.glob("shard_*.pt"))) >= 1, "SynthActor", busy_in="run")
    stats: dict = {}
    manifest = run_pool(cfg, out, names, outliers, fingerprint="fp", progress=False, stats=stats)
    killer.join(5)
    assert "pid" in killer.result, "no actor was killed: the fault was not exercised"
    # the dead actor's shard went back to the queue and was computed by its replacement (not an idle actor's death)
    assert stats["actors_replaced"] >= 1 and len(stats["requeued_shards"]) >= 1
    plan = plan_shards(24, 3, cfg.seed)
    assert manifest["count"] == 24 and manifest["shards"] == [s.filename for s in plan]
    assert sorted(p.name for p in out.glob("shard_*.pt")) == [s.filename for s in plan]
    assert not list(out.glob("*.tmp"))
    # every shard is what a single process computes for it: nothing lost, nothing computed twice differently
    reference = LatentSynthesizer(cfg.diffusion, names, outliers, "cpu", cfg.seed)
    for spec in (plan[0], plan[-1]):
        got = torch.load(out / spec.filename, weights_only=True)
        assert torch.allclose(got["vectors"], reference.run(spec)["vectors"], atol=1e-5)


def test_a_shard_whose_worker_dies_is_retried_alone(ray_driver, tmp_path, monkeypatch):
    """jobs.common.on_shards: the worker of shard 1 dies (its process exits) on its first attempt; Ray runs that
    shard again, the other shard once, and the merge gets both results in shard order. Every task works in the
    driver's object cache (it reads the driver's mirror paths), whatever its own environment says."""
    from jobs import common
    from oal import storage

    monkeypatch.setenv(storage.OBJECT_CACHE_ENV, str(tmp_path / "driver-cache"))

    cfg = _cfg(tmp_path, "cluster.shards=2", "cluster.cpus_per_worker=1", "cluster.max_failures=2")
    marks = tmp_path / "attempts"
    marks.mkdir()

    def shard_fn(value, shard):
        i, n = shard
        (marks / f"{i}-{os.getpid()}-{time.monotonic_ns()}").touch()
        if i == 1 and not (marks / "died").exists():
            (marks / "died").touch()
            os._exit(1)  # the worker process dies, as on a lost node
        return {"i": i, "n": n, "value": value * (i + 1), "pid": os.getpid(), "cache": str(storage.cache_root())}

    def finish(parts):
        return [(p["i"], p["n"], p["value"], p["cache"]) for p in parts], (os.getpid(), str(storage.cache_root()))

    merged, (merger, merger_cache) = common.on_shards(cfg.cluster, "the test stage", shard_fn, finish, 7)
    cache = str((tmp_path / "driver-cache").resolve())
    assert merged == [(0, 2, 7, cache), (1, 2, 14, cache)] and merger_cache == cache
    assert merger != os.getpid()
    attempts = [p.name.split("-")[0] for p in marks.iterdir() if p.name != "died"]
    assert sorted(attempts) == ["0", "1", "1"], attempts  # shard 1 twice: the retry ran; shard 0 once
    # a synthesis actor works in the driver's cache too (it loads the diffusion checkpoint by its mirror path)
    import ray
    import torch

    from jobs.synthesize import ActorPool

    pool = ActorPool(_cfg(tmp_path, "diffusion.steps=2"), ["a", "b"], torch.zeros(2, 1, 32), size=1)
    try:
        seen = ray.get(pool.actors[0].__ray_call__.remote(lambda actor: os.environ.get(storage.OBJECT_CACHE_ENV)))
    finally:
        pool.shutdown()
    assert seen == cache


def _registered_epoch(snapshots: list[bytes]) -> int:
    """The last epoch whose checkpoint Ray Train's controller has registered (0 if none), from its runs'
    checkpoint-manager snapshots. A checkpoint folder in storage is not enough: the controller collects reports by
    polling, and a worker killed before the poll takes its unregistered reports with it (the restart then starts
    from scratch)."""
    best = 0
    for text in snapshots:
        try:
            results = json.loads(text).get("checkpoint_results", [])
        except json.JSONDecodeError:  # being written
            continue
        best = max([best, *(int(r["metrics"].get("epoch", 0)) for r in results)])
    return best


@pytest.mark.stack
def test_killed_training_worker_resumes_from_its_checkpoint_in_s3(stack, ray_driver, tmp_path):
    """cluster.storage_path=s3://...: Ray Train's checkpoints go to the S3 server, nothing to the default local
    storage. A training worker SIGKILLed once epoch 2's checkpoint is registered: the restarted group reads that
    checkpoint back from S3 and goes on from there, and the stage finishes from its last checkpoint, read back from
    S3 too."""
    import boto3
    from botocore.exceptions import ClientError

    from jobs.train import run_stage

    bucket, prefix = stack.env["OAL_S3_BUCKET"], f"ray-storage-{tmp_path.name}"
    s3 = boto3.client("s3", endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"])
    cfg = _cfg(tmp_path, "teacher.epochs=8", "cluster.max_failures=2", "name=killw",
               f"cluster.storage_path=s3://{bucket}/{prefix}")

    def keys() -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]

    def snapshots() -> list[bytes]:
        found = []
        for k in keys():
            if k.endswith("/checkpoint_manager_snapshot.json"):
                try:
                    found.append(s3.get_object(Bucket=bucket, Key=k)["Body"].read())
                except ClientError:  # replaced between the listing and the read
                    pass
        return found

    killer = _kill_when(lambda: _registered_epoch(snapshots()) >= 2, "RayTrainWorker")
    res = run_stage(cfg, "teacher", progress=False)
    killer.join(5)
    assert "pid" in killer.result, "no worker was killed: the fault was not exercised"
    ck = torch.load(res.outputs["checkpoint"], weights_only=True)
    assert ck["epoch"] == 8
    manifest = json.loads((tmp_path / "killw" / "teacher" / "stage.json").read_text())
    epochs = [int(h["epoch"]) for h in manifest["history"]]
    # The restarted group resumed from a reported checkpoint (epoch >= 2), not from scratch, and the
    # history still holds every epoch (more than cluster.checkpoints_to_keep of them), each once.
    assert manifest["resumed_from_epoch"] >= 2
    assert epochs == list(range(1, 9))
    found = keys()
    assert any(k.endswith("/checkpoint.pt") and "/checkpoint_" in k for k in found), found[:20]
    assert not (tmp_path / "killw" / "ray").exists()  # nothing went to the default local storage

    # Cut after the last epoch's checkpoint was reported, before the stage was recorded (its manifest gone): run
    # again, Ray Train restores that checkpoint and nothing is left to train. The last epoch is reported once more
    # (what a Tune trial that missed it ranks by) and the stage records where it resumed.
    from ray.train import UserCallback

    class ReportsTo(UserCallback):
        """Appends rank 0's reported numbers to a file (runs in the run's controller)."""

        def __init__(self, path: str) -> None:
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.path, "a") as f:
                f.write(json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}) + "\n")

    (tmp_path / "killw" / "teacher" / "stage.json").unlink()
    reports = tmp_path / "reports.jsonl"
    run_stage(cfg, "teacher", progress=False, callbacks=[ReportsTo(str(reports))])
    manifest = json.loads((tmp_path / "killw" / "teacher" / "stage.json").read_text())
    assert manifest["resumed_from_epoch"] == 8 and [int(h["epoch"]) for h in manifest["history"]] == list(range(1, 9))
    assert [r["epoch"] for r in map(json.loads, reports.read_text().splitlines())] == [8]


def test_impossible_resources_fail_fast_with_numbers(ray_driver, tmp_path):
    from jobs import synthesize, train
    from jobs.common import require_resources
    from oal.config import ClusterConfig

    cfg = _cfg(tmp_path, "cluster.use_gpu=true", "name=gpus")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"need 1 GPU \(the cluster has 0\).*cluster.autoscaling=true"):
        train.run_stage(cfg, "teacher", progress=False)
    with pytest.raises(RuntimeError, match=r"synthesis actor with one GPU need 1 GPU \(the cluster has 0\)"):
        synthesize.check_resources(cfg.cluster)
    cpus = int(ray_driver.cluster_resources()["CPU"])
    with pytest.raises(RuntimeError, match=rf"need {cpus + 1} CPU \(the cluster has {cpus}\)"):
        train.check_resources(_cfg(tmp_path, f"cluster.num_workers={cpus + 1}").cluster)
    assert time.monotonic() - t0 < 10 and not (tmp_path / "gpus" / "teacher").exists()
    # An autoscaling cluster that publishes no maximum (this local head) is not judged by what it has now.
    require_resources({"GPU": 8}, "eight GPU workers", ClusterConfig(autoscaling=True))


def test_an_autoscaling_cluster_is_judged_by_the_maximum_its_autoscaler_publishes(ray_driver):
    """Autoscaler v2 (KubeRay, `ray up` with v2) reports its node groups to the GCS, which keeps them in its
    internal KV; `require_resources` reads them from there. This head runs no autoscaler, so the test writes the
    same record the GCS stores (a `ClusterConfig` protobuf under the autoscaler's namespace and key) to the real
    GCS, then takes it out again: the read path, the arithmetic over node groups and the error are Ray's and ours."""
    import ray._raylet as raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from jobs.common import require_resources
    from oal.config import ClusterConfig

    published = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 2}, min_count=1, max_count=1),
        autoscaler_pb2.NodeGroupConfig(name="gpu-workers", resources={"CPU": 8, "GPU": 1}, max_count=4),
    ])
    ns, key = raylet.GCS_AUTOSCALER_STATE_NAMESPACE, raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    assert internal_kv._internal_kv_get(key, namespace=ns) is None  # nothing else published one on this head
    internal_kv._internal_kv_put(key, published.SerializeToString(), namespace=ns)
    try:
        auto = ClusterConfig(autoscaling=True)
        require_resources({"GPU": 4, "CPU": 34}, "four GPU workers", auto)  # the most it can grow to: passes
        with pytest.raises(RuntimeError, match=r"four GPU workers need 5 GPU \(the cluster can grow to 4\): this "
                                               r"would wait forever"):
            require_resources({"GPU": 5}, "four GPU workers", auto)
        with pytest.raises(RuntimeError, match=r"need 35 CPU \(the cluster can grow to 34\)"):
            require_resources({"CPU": 35}, "the CPU stage", auto)
        # A cap on the whole cluster (max_resources) wins over the sum of its node groups.
        published.max_resources["GPU"] = 2
        internal_kv._internal_kv_put(key, published.SerializeToString(), namespace=ns)
        with pytest.raises(RuntimeError, match=r"need 3 GPU \(the cluster can grow to 2\)"):
            require_resources({"GPU": 3}, "three GPU workers", auto)
        # The same head without autoscaling is judged by what it has now: no GPU.
        with pytest.raises(RuntimeError, match=r"need 1 GPU \(the cluster has 0\)"):
            require_resources({"GPU": 1}, "one GPU worker", ClusterConfig(autoscaling=False))
    finally:
        internal_kv._internal_kv_del(key, namespace=ns)


def test_clients_without_the_right_token_are_told_where_it_is_read(ray_head, tmp_path):
    import subprocess
    import sys

    from tests.stack_fixtures import free_ports

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    cmd = [sys.executable, "-m", "jobs.train", "--config", "digits", f"output_dir={tmp_path}"]
    # the three clients at once (each spends most of its time importing)
    procs = {
        "none": subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True),
        "wrong": subprocess.Popen(cmd, env={**env, "RAY_AUTH_TOKEN": "0" * 32}, cwd=REPO, stderr=subprocess.PIPE,
                                  text=True),
        # nothing listening at the address
        "nobody": subprocess.Popen(cmd, env={**env, "RAY_ADDRESS": f"127.0.0.1:{free_ports(1)[0]}"}, cwd=REPO,
                                   stderr=subprocess.PIPE, text=True),
    }
    err = {k: p.communicate(timeout=180)[1] for k, p in procs.items()}
    for k in ("none", "wrong"):
        p = procs[k]
        assert p.returncode != 0 and "~/.ray/auth_token" in err[k] and "RAY_AUTH_TOKEN_PATH" in err[k], err[k][-2000:]
        assert "Traceback" not in err[k]
    assert "no authentication token was found" in err["none"]
    assert "most likely the token does not match" in err["wrong"]
    # Nothing listening at the address: the command to start a cluster, at once.
    assert procs["nobody"].returncode != 0 and "python -m cluster.stack up" in err["nobody"], err["nobody"][-2000:]


def test_metric_writes_that_fail_after_the_server_stops_mid_stage_reach_the_driver(ray_driver, tmp_path):
    """Rank 0 logs each epoch's metrics to MLflow from its worker process. A real MLflow server (its own, no
    login: the session's must stay up) takes the first epoch's, then is killed while the stage trains: the later
    epochs go to the worker's buffer file, and the stage's logger in the driver counts every one of those writes
    (what the pipeline reports at the end). Nothing is lost: server rows and buffer rows cover every epoch once."""
    import signal
    import sqlite3
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from jobs import train as jt
    from oal.tracking import MetricLogger
    from tests.stack_fixtures import free_ports

    port, epochs = free_ports(1)[0], 4  # epoch 1 on the server, the (at least 2) later ones in the buffer
    uri, db = f"http://127.0.0.1:{port}", tmp_path / "mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{db}", "--no-serve-artifacts",
         "--default-artifact-root", (tmp_path / "artifacts").as_uri()],
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed: dict = {}
    try:
        client = MlflowClient(uri)
        deadline = time.time() + 120
        while True:
            try:
                exp = client.create_experiment("mid-run-stop")
                break
            except Exception:
                assert time.time() < deadline and server.poll() is None, "the MLflow server did not start"
                time.sleep(1)
        run_id = client.create_run(exp).info.run_id

        def kill_after_first_epoch() -> None:  # the server answers epoch 1, then goes away
            while not client.get_run(run_id).data.metrics:
                time.sleep(0.05)
            os.killpg(server.pid, signal.SIGKILL)
            killed["at"] = time.time()

        watcher = threading.Thread(target=kill_after_first_epoch, daemon=True)
        watcher.start()
        cfg = _cfg(tmp_path, f"teacher.epochs={epochs}", f"tracking.uri={uri}")
        driver = MetricLogger(run_id, tmp_path / "driver_buffer.jsonl", uri)
        res = jt.run_stage(cfg, "teacher", progress=False, mlflow_run_id=run_id, tracking=driver)
        watcher.join(timeout=5)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    assert not res.skipped and "at" in killed, "the server was never stopped mid-stage"
    with sqlite3.connect(db) as con:
        logged = sorted({s for (s,) in con.execute("select step from metrics where run_uuid = ?", (run_id,))})
    rows = [json.loads(x) for x in (tmp_path / "digits" / "teacher" / "tracking_buffer.jsonl").read_text().splitlines()]
    buffered = [r["step"] for r in rows]
    # The server holds the first epochs, the buffer the rest, each epoch exactly once.
    assert logged and buffered and logged[0] == 1 and logged + buffered == list(range(1, epochs + 1)), (logged, buffered)
    assert driver.failed == sum(len(r["metrics"]) for r in rows) > 0  # and the driver counts every failed write
