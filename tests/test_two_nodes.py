"""Two Ray nodes that share no disk: the session's head, plus a worker node started with `ray start --address`
(token auth, its own Ray temp dir) in a mount namespace of its own, where the jobs' object cache path is a folder
the head never sees. The pipeline, submitted with `ray job submit`, places its training, sharded and synthesis
stages on the worker node (cluster.label_selector), the driver stays on the head: every file either node reads
from the other must have gone through the S3 server.

Needs `unshare` (util-linux) and a kernel that allows mount namespaces (as root, or through a user namespace)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
    mirror: Path  # the jobs' object cache path (OAL_OBJECT_CACHE), the same on both nodes; the head's folder
    disk: Path  # what the worker node finds at that path: its own disk
    log: Path


def _namespace() -> list[str]:
    """A private mount namespace: as root directly, otherwise inside a user namespace mapping us to root."""
    if shutil.which("unshare") is None:
        pytest.fail("the two-node test needs `unshare` (util-linux) for the worker node's own disk")
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private"]


@pytest.fixture(scope="module")
def worker_node(stack, tmp_path_factory):
    import ray

    base = tmp_path_factory.mktemp("two-nodes")
    mirror, disk, log = base / "mirror", base / "worker-disk", base / "worker-node.log"
    mirror.mkdir()
    disk.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="oalw-"))  # short: Ray's socket paths must stay under 108 bytes
    (agent,) = free_ports(1)
    gcs = f"[::ffff:127.0.0.1]:{stack.stack.ray_gcs_port}"  # not the literal 127.0.0.1, which `ray start` would
    # replace by the machine's network address when multi-node is enabled
    start = [str(Path(sys.executable).parent / "ray"), "start", "--address", gcs, "--node-ip-address", "127.0.0.2",
             "--num-cpus", "1", "--labels", "=".join(LABEL), "--temp-dir", str(ray_tmp),
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
            found = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n.get("Labels", {}).get(LABEL[0]) == LABEL[1]]
            node_id = found[0] if found else None
            if node_id is None:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"the worker node did not join the head:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
        yield WorkerNode(node_id, mirror, disk, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_pipeline_on_two_nodes_reads_the_other_nodes_files_only_from_s3(stack, worker_node, tmp_path):
    import boto3
    from ray.job_submission import JobStatus, JobSubmissionClient

    bucket, prefix = stack.env["OAL_S3_BUCKET"], f"two-nodes-{tmp_path.name}"
    s3 = boto3.client("s3", endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"])
    # One epoch per network: where each stage runs is the point, not what it learns.
    overrides = " ".join([*QUICK, "teacher.epochs=1", "student.epochs=1", f"output_dir=s3://{bucket}/{prefix}",
                          f"cluster.label_selector.{LABEL[0]}={LABEL[1]}"])
    client = JobSubmissionClient(stack.env["RAY_API_SERVER_ADDRESS"])
    job = client.submit_job(entrypoint=f"python -m jobs.pipeline --config digits --no-progress {overrides}",
                            runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git", "runs", ".stack", "*.pt"],
                                         "env_vars": {"OAL_OBJECT_CACHE": str(worker_node.mirror)}})
    if wait_job(client, job, timeout=600) != JobStatus.SUCCEEDED:
        logs = client.get_job_logs(job)
        at = logs.rfind("Traceback")  # the error, not Ray's object-store statistics printed after it
        pytest.fail(f"the job failed:\n{logs[at:at + 4000] if at >= 0 else logs[-4000:]}")

    def stored(rel):
        return s3.get_object(Bucket=bucket, Key=f"{prefix}/digits/{rel}")

    run = Path("s3", bucket, prefix, "digits")
    head, worker = worker_node.mirror / run, worker_node.disk / run
    for stage in PLACED:
        written_by = json.loads(stored(f"{stage}/stage.json")["Body"].read())["written_by"]
        assert written_by.get("node") == worker_node.node_id, (stage, written_by)
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
    results = json.loads(stored("eval/results.json")["Body"].read())
    assert results.get("chosen"), sorted(results)
