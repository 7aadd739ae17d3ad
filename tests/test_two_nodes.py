"""Two Ray nodes that share no disk: the session's head, plus a worker node started with `ray start --address`
(token auth, its own Ray temp dir) in a mount namespace of its own, where the jobs' object cache path is a folder
the head never sees. The pipeline, submitted with `ray job submit`, places its training, sharded and synthesis
stages on the worker node (cluster.label_selector), the driver stays on the head: every file either node reads
from the other must have gone through the S3 server.

Needs `unshare` (util-linux) and a kernel that allows mount namespaces (as root, or through a user namespace)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import QUICK
from tests.stack_fixtures import free_ports, wait_job

pytestmark = [pytest.mark.ray, pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).parents[1]
LABEL = ("oal-role", "work")
# The stages the job computes on the worker node (each writes its manifest there).
PLACED = ("teacher", "embeddings", "anchors", "knn", "latents", "student", "eval", "detector")


@dataclass
class WorkerNode:
    node_id: str
    pid: int  # the node's `ray start --block`
    ray_tmp: Path  # its Ray temp dir, named on the command line of its raylet and agents (a worker renames itself)
    mirror: Path  # the jobs' object cache path (OAL_OBJECT_CACHE), the same on both nodes; the head's folder
    disk: Path  # what the worker node finds at that path: its own disk
    log: Path

    def lose(self) -> int:
        """SIGKILL every process of the node at once, as when its machine goes away; returns how many. The node's
        workers and actors are its raylet's children: their command line (`ray::LatentActor`) names no temp dir, and
        left alive they could return a result or two before noticing their raylet is gone (seen on a fast host)."""
        import psutil

        named = [p for p in psutil.process_iter(["pid", "cmdline"])
                 if p.info["pid"] == self.pid or str(self.ray_tmp) in " ".join(p.info["cmdline"] or [])]
        doomed = {p.pid: p for p in named}
        for p in named:
            with contextlib.suppress(psutil.NoSuchProcess):
                doomed.update((c.pid, c) for c in p.children(recursive=True))
        for p in doomed.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        return len(doomed)


def _namespace() -> list[str]:
    """A private mount namespace: as root directly, otherwise inside a user namespace mapping us to root."""
    if shutil.which("unshare") is None:
        pytest.fail("the two-node test needs `unshare` (util-linux) for the worker node's own disk")
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private"]


@contextlib.contextmanager
def _node(stack, base: Path, label: tuple[str, str]) -> Iterator[WorkerNode]:
    """A worker node joined to the session's head, carrying `label`, with a disk of its own (see the module doc)."""
    import ray

    mirror, disk, log = base / "mirror", base / "worker-disk", base / "worker-node.log"
    mirror.mkdir(parents=True)
    disk.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="oalw-"))  # short: Ray's socket paths must stay under 108 bytes
    (agent,) = free_ports(1)
    gcs = f"[::ffff:127.0.0.1]:{stack.stack.ray_gcs_port}"  # not the literal 127.0.0.1, which `ray start` would
    # replace by the machine's network address when multi-node is enabled
    start = [str(Path(sys.executable).parent / "ray"), "start", "--address", gcs, "--node-ip-address", "127.0.0.2",
             "--num-cpus", "1", "--labels", "=".join(label), "--temp-dir", str(ray_tmp),
             "--dashboard-agent-listen-port", str(agent), "--disable-usage-stats", "--block"]
    script = f"mount --bind {disk} {mirror} && exec {' '.join(start)}"
    # What a node of a cluster needs: the credentials (S3, MLflow) and the token auth; the head's stack env has them.
    env = {**os.environ, **stack.env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([*_namespace(), "sh", "-c", script], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        if not ray.is_initialized():
            ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
        deadline, node_id = time.monotonic() + 90, None
        while node_id is None:
            found = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n.get("Labels", {}).get(label[0]) == label[1]]
            node_id = found[0] if found else None
            if node_id is None:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"the worker node did not join the head:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
        yield WorkerNode(node_id, proc.pid, ray_tmp, mirror, disk, log)
    finally:
        with contextlib.suppress(ProcessLookupError):  # lost on purpose by a test
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def worker_node(stack, tmp_path_factory):
    with _node(stack, tmp_path_factory.mktemp("two-nodes"), LABEL) as node:
        yield node


def _lose_when(node: WorkerNode, happened: Callable[[], bool], within: float) -> tuple[threading.Thread, list[int]]:
    """A started thread that loses `node` (WorkerNode.lose) once `happened()`, or after `within` seconds; the list
    receives how many processes it killed."""
    lost: list[int] = []

    def watch() -> None:
        deadline = time.time() + within
        while time.time() < deadline and not happened():
            time.sleep(0.1)
        lost.append(node.lose())

    killer = threading.Thread(target=watch, daemon=True)
    killer.start()
    return killer, lost


@contextlib.contextmanager
def _warnings_of(logger: str) -> Iterator[list[str]]:
    """The WARNING messages `logger` emits meanwhile (whether or not "oal" propagates to the root logger here)."""
    seen: list[str] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger(logger).addHandler(catcher)
    try:
        yield seen
    finally:
        logging.getLogger(logger).removeHandler(catcher)


def _teacher_reported(s3, bucket: str, run: str) -> bool:
    """Whether Ray Train holds a reported checkpoint of the teacher under `run` (a key prefix) in the bucket. Held
    means registered in the run's checkpoint-manager snapshot, which a restarted run restores from: a checkpoint_*
    folder alone can be an upload the manager has not registered yet (a resume from scratch)."""
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{run}/ray/").get("Contents", [])
    snaps = [o["Key"] for o in listed if "teacher" in o["Key"] and o["Key"].endswith("/checkpoint_manager_snapshot.json")]
    return any(json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read()).get("latest_checkpoint_result")
               for k in snaps)


def _finished(client, job, timeout=600):
    """Wait for `job`; fail with its error (not Ray's object-store statistics printed after it) unless it succeeded."""
    from ray.job_submission import JobStatus

    if wait_job(client, job, timeout=timeout) != JobStatus.SUCCEEDED:
        logs = client.get_job_logs(job)
        at = logs.rfind("Traceback")
        pytest.fail(f"job {job} did not succeed:\n{logs[at:at + 4000] if at >= 0 else logs[-4000:]}")
    return client.get_job_logs(job)


def test_pipeline_on_two_nodes_without_a_shared_disk_survives_stop_and_resubmit(stack, worker_node, tmp_path):
    """The pipeline with output_dir=s3://... placed on the worker node: stopped while the teacher trains there,
    resubmitted, it resumes from the checkpoint in S3; every stage ran on the worker node, and what one node wrote
    the other read only from the bucket. (That a node with an empty mirror finds such a run complete from the
    manifests in the bucket, fetching no checkpoint: test_storage.)"""
    import boto3
    from ray.job_submission import JobStatus, JobSubmissionClient

    bucket, prefix = stack.env["OAL_S3_BUCKET"], f"two-nodes-{tmp_path.name}"
    s3 = boto3.client("s3", endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"])
    # 5 teacher epochs: the job is stopped after the first one is reported, 4 epochs before the stage can finish
    overrides = " ".join([*QUICK, "teacher.epochs=5", "student.epochs=1", f"output_dir=s3://{bucket}/{prefix}",
                          f"cluster.label_selector.{LABEL[0]}={LABEL[1]}"])
    entry = f"python -m jobs.pipeline --config digits --no-progress {overrides}"
    runtime_env = {"working_dir": str(REPO), "excludes": [".venv", ".git", "runs", ".stack", "*.pt"],
                   "env_vars": {"OAL_OBJECT_CACHE": str(worker_node.mirror)}}
    client = JobSubmissionClient(stack.env["RAY_API_SERVER_ADDRESS"])

    def keys(under):
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/digits/{under}").get("Contents", [])]

    def stored(rel):
        return s3.get_object(Bucket=bucket, Key=f"{prefix}/digits/{rel}")

    def stored_json(rel):
        return json.loads(stored(rel)["Body"].read())

    first = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
    teacher_done = lambda: bool(keys("teacher/stage.json"))  # noqa: E731

    # Stop while the teacher trains: once Ray Train holds a reported checkpoint of it (in S3), before it finishes.
    def reported():
        return _teacher_reported(s3, bucket, f"{prefix}/digits")

    deadline = time.time() + 300
    while not reported() and not teacher_done() and time.time() < deadline:
        assert client.get_job_status(first) != JobStatus.FAILED, client.get_job_logs(first)[-3000:]
        time.sleep(0.2)
    client.stop_job(first)
    assert wait_job(client, first, timeout=120) == JobStatus.STOPPED
    assert reported() and not teacher_done(), "the job was not stopped while the teacher was training"

    logs = _finished(client, client.submit_job(entrypoint=entry, runtime_env=runtime_env))
    # the teacher went on from its last reported checkpoint, not from scratch, and its history has every epoch once
    teacher = stored_json("teacher/stage.json")
    assert teacher["resumed_from_epoch"] >= 1, teacher["resumed_from_epoch"]
    assert [int(h["epoch"]) for h in teacher["history"]] == list(range(1, 6))
    assert "teacher: resuming from the reported checkpoint" in logs
    assert "[eval] done" in logs and "| ebo |" in logs
    # what a stage logs in the Ray worker that computed it (on the worker node) reaches the job log
    assert re.search(r"pid=\d+, ip=127\.0\.0\.2\).*oal INFO anchors: .*nearest-anchor accuracy", logs), logs[-4000:]
    # The student trained on Ray Train, reporting a checkpoint per epoch, without Ray's two INFO lines per report
    # in the job log (jobs.train.quiet_ray_train_reports)
    assert "[student] done" in logs
    assert "Checkpoint successfully created" not in logs and "Reporting training result" not in logs
    # every stage ran on the worker node, and its outputs are named by their S3 URIs and are in the bucket
    for stage in PLACED:
        manifest = stored_json(f"{stage}/stage.json")
        assert manifest["written_by"].get("node") == worker_node.node_id, (stage, manifest["written_by"])
        for out in manifest["outputs"].values():
            assert out.startswith(f"s3://{bucket}/{prefix}/digits/{stage}/") and keys(out.split("/digits/")[1]), out
    assert 0.0 < stored_json("eval/results.json")["id_accuracy"] <= 1.0
    latents = stored_json("latents/manifest.json")
    assert latents["count"] == 12 and latents["untrained_model"]

    run = Path("s3", bucket, prefix, "digits")
    head, worker = worker_node.mirror / run, worker_node.disk / run
    # Written on the worker node, never needed by the head: on the worker's disk, in the store, not on the head's disk.
    for rel in ("teacher/checkpoint.pt", "embeddings/id_embeddings.pt", "anchors/anchors.pt"):
        assert (worker / rel).is_file() and stored(rel)["ContentLength"] == (worker / rel).stat().st_size, rel
        assert not (head / rel).exists(), f"{rel}: the head's disk holds a file only the worker node wrote"
    # Written by the driver on the head (it gathers the synthesis shards), read by the student on the worker node:
    # the worker's copy came from the store (its version mark is the object's ETag), the same bytes.
    rel = "latents/latent_vectors.pt"
    etag = stored(rel)["ETag"]
    assert (head / rel).read_bytes() == (worker / rel).read_bytes()
    mark = worker_node.disk / "versions" / run / rel
    assert mark.is_file() and etag.strip('"') in mark.read_text(), (mark, etag)


def test_pipeline_loses_its_node_while_the_teacher_trains_and_ends_as_without_the_loss(stack, tmp_path):
    """The pipeline (jobs.pipeline.run, this process its driver) with its stages placed on a node of its own (label
    oal-role=lossy), every process of that node killed once the teacher has reported a checkpoint (in S3): the
    teacher's run fails, no node carries the label any more, and it goes on on the head from that checkpoint
    (jobs.train.fit_placed): resumed epoch above 0, every epoch once. The stages after it run on the head too
    (jobs.common.selector_now) instead of failing for want of a labelled node. What it ends with equals the same
    pipeline in one process with nothing lost: the teacher's weights, its numbers every epoch, the results table."""
    import boto3
    import torch

    from jobs import pipeline
    from oal import registry, stages, storage
    from oal.config import load_config
    from oal.tracking import Tracker

    label = ("oal-role", "lossy")
    bucket, prefix = stack.env["OAL_S3_BUCKET"], f"pipeline-loss-{tmp_path.name}"
    s3 = boto3.client("s3", endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"])
    overrides = [*QUICK, "teacher.epochs=6", "student.epochs=1"]
    cfg = load_config("digits", [*overrides, f"output_dir=s3://{bucket}/{prefix}", "cluster.max_failures=0",
                                 f"cluster.label_selector.{label[0]}={label[1]}"])
    with _node(stack, tmp_path / "node", label) as node:
        killer, lost = _lose_when(node, lambda: _teacher_reported(s3, bucket, f"{prefix}/digits"), 240)
        with _warnings_of("oal.jobs") as warnings:
            results = pipeline.run(cfg, progress=False, tracker=Tracker(None))  # not tracked: this test's own figures
        killer.join(5)
    assert lost and lost[0] >= 3, f"the node was not lost (processes killed: {lost})"
    assert any("teacher: no alive node carries the labels" in w for w in warnings), warnings
    manifests = {name: stages.read_manifest(res.dir) for name, res in results.items()}
    teacher = manifests["teacher"]
    assert teacher is not None and teacher["resumed_from_epoch"] >= 1, teacher
    assert [int(h["epoch"]) for h in teacher["history"]] == list(range(1, 7))
    # the teacher finished on the head, and so did every stage after it
    where = {name: (m or {}).get("written_by", {}).get("node") for name, m in manifests.items()}
    assert len(where) >= 8 and all(n not in (None, node.node_id) for n in where.values()), where

    # The same pipeline in this process, nothing lost.
    alone = registry.run_pipeline(load_config("digits", [*overrides, f"output_dir={tmp_path / 'alone'}"]),
                                progress=False)
    lost_run, whole = (torch.load(p, map_location="cpu", weights_only=True)
                       for p in (storage.pull(results["teacher"].outputs["checkpoint"]),
                                 alone["teacher"].outputs["checkpoint"]))
    for name, tensor in whole["modules"].items():
        assert torch.allclose(lost_run["modules"][name], tensor, atol=1e-6), name
    for a, b in zip(lost_run["history"], whole["history"], strict=True):
        assert a["val/id_accuracy"] == b["val/id_accuracy"] and a["loss/total"] == pytest.approx(b["loss/total"], abs=1e-6)
    mine, theirs = (json.loads(storage.read_text(r["eval"].outputs["results"]) or "{}") for r in (results, alone))
    assert mine["id_accuracy"] == theirs["id_accuracy"]
    for pp, splits in theirs["results"].items():
        for split in ("near", "far"):
            assert mine["results"][pp][split]["auroc"] == pytest.approx(splits[split]["auroc"], abs=1e-6), (pp, split)


def _shard(starts: str, pause: float, shard: tuple[int, int]) -> tuple[int, str]:
    """A shard of tests' own: says where and when it starts (a line in `starts`), works `pause` seconds."""
    from oal.stages import NODE_ENV

    with open(starts, "a") as f:
        f.write(f"{shard[0]}\n")
    time.sleep(pause)
    return shard[0], os.environ[NODE_ENV]


def _gather(parts: list[tuple[int, str]]) -> tuple[list[tuple[int, str]], str]:
    from oal.stages import NODE_ENV

    return parts, os.environ[NODE_ENV]


def test_sharded_tasks_lose_their_node_and_finish_on_the_head(stack, tmp_path):
    """Two shards placed on a one-CPU node of their own (one runs, one waits), the node killed while the first
    runs: Ray retries it with the same selector, which no node satisfies any more; `jobs.common.placed` sees that
    and makes both waiting shards again on any node. Each shard runs to its end once, the lost one started twice,
    the merge runs on the head, a warning says why."""
    import ray

    from jobs.common import on_shards
    from oal.config import load_config

    label = ("oal-role", "shards")
    cfg = load_config("digits", ["cluster.shards=2", "cluster.max_failures=2",
                                 f"cluster.label_selector.{label[0]}={label[1]}"])
    starts = tmp_path / "starts"
    with _node(stack, tmp_path / "node", label) as node:
        killer, lost = _lose_when(node, lambda: starts.exists() and bool(starts.read_text()), 120)
        done: dict = {}
        with _warnings_of("oal.jobs") as warnings:
            run = threading.Thread(target=lambda: done.update(result=on_shards(
                cfg.cluster, "the test's shards", _shard, _gather, str(starts), 4.0)), daemon=True)
            run.start()
            run.join(90)
        killer.join(5)
    if run.is_alive():  # still waiting in ray.get: disconnect this driver, or the session could not end
        ray.shutdown()
        pytest.fail(f"the shards did not finish after their node was lost (lost: {lost}): {warnings}")
    assert lost and lost[0] >= 3, f"the node was not lost (processes killed: {lost})"
    assert "result" in done, f"the shards failed after their node was lost: {warnings}"
    parts, merged_on = done["result"]
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}  # the head (and the module's worker node, if up)
    assert [i for i, _ in parts] == [0, 1] and {where for _, where in parts} | {merged_on} <= alive - {node.node_id}
    # the running shard was lost and started again once; the waiting one never started on the lost node
    first, *later = starts.read_text().split()
    assert sorted(later) == ["0", "1"] and first in later, starts.read_text()
    assert any("no alive node carries the labels" in w and "2 waiting task(s)" in w for w in warnings), warnings


def test_synthesis_loses_the_worker_node_and_finishes_on_the_head(worker_node, tmp_path):
    """The latents stage's actor pool placed on the worker node (cluster.label_selector), the node killed (its raylet
    and workers) once a shard is written: the lost actor's shard is requeued once and the replacement, finding no
    node with the label, runs on the head; every shard is there once and equals a single process's. Runs last: it
    loses the module's worker node."""
    import torch

    from jobs.synthesize import run_pool
    from oal.config import load_config
    from oal.synthesize import LatentSynthesizer, plan_shards

    cfg = load_config("digits", [*QUICK, f"output_dir={tmp_path}", "diffusion.num_outliers=12", "diffusion.shard_size=2",
                                 "diffusion.steps=40", "cluster.synth_actors=1",  # shards slow enough to lose one
                                 f"cluster.label_selector.{LABEL[0]}={LABEL[1]}"])
    names = ["zero", "one", "two"]
    outliers = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "latents"

    killer, lost = _lose_when(worker_node, lambda: bool(list(out.glob("shard_*.pt"))), 240)
    stats: dict = {}
    done: dict = {}
    with _warnings_of("oal.jobs") as warnings:
        pool = threading.Thread(target=lambda: done.update(manifest=run_pool(
            cfg, out, names, outliers, fingerprint="fp", progress=False, stats=stats)), daemon=True)
        pool.start()
        pool.join(300)
        killer.join(5)
    assert "manifest" in done, f"the pool did not finish after the node was lost: {stats}, {warnings}"
    assert lost and lost[0] >= 3, f"the node was not lost (processes killed: {lost})"  # ray start, raylet, worker
    # the replacement went to the head, as no node with the label was left
    assert any("no alive node carries the labels" in w for w in warnings), (stats, warnings)
    # the lost actor's shard went back to the queue once; nothing was lost or written twice differently
    assert stats["actors_replaced"] >= 1 and len(stats["requeued_shards"]) == len(set(stats["requeued_shards"])) >= 1
    plan = plan_shards(12, 2, cfg.seed)
    assert done["manifest"]["count"] == 12 and done["manifest"]["shards"] == [s.filename for s in plan]
    assert sorted(p.name for p in out.glob("shard_*.pt")) == [s.filename for s in plan]
    reference = LatentSynthesizer(cfg.diffusion, names, outliers, "cpu", cfg.seed)
    for spec in (plan[0], plan[-1]):
        got = torch.load(out / spec.filename, weights_only=True)
        assert torch.allclose(got["vectors"], reference.run(spec)["vectors"], atol=1e-5)
