"""cluster/: the YAML files the jobs rely on, and the local stack for real (S3, MLflow, a token-authenticated
Ray head). The stack tests use the session fixtures of tests/stack_fixtures.py."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from cluster.stack import SERVICES, Stack, StackError
from tests.stack_fixtures import RunningStack, free_ports, wait_job

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
ENTRYPOINT = "python -m jobs.pipeline --config digits cluster.use_gpu=true cluster.autoscaling=true"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# ------------------------------------------------------------------ the YAML files


def test_runtime_env_keeps_the_upload_small_and_the_code_in():
    from ray._private.runtime_env.packaging import _get_excludes
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert {".venv", ".git"} <= set(env["excludes"]) and "/runs" in env["excludes"]
    excluded = _get_excludes(REPO, env["excludes"])  # the matcher `ray job submit` applies
    for path in (".venv/bin/python", ".git/HEAD", "runs/digits/teacher/checkpoint.pt", ".stack/env",
                 "oal/__pycache__/config.cpython-311.pyc", ".mypy_cache/3.11/cache.db", ".pytest_cache/v/x",
                 "weights/vit_b16.pt", "model.safetensors", "runs/fashion/x/model.safetensors"):
        assert excluded(REPO / path), path
    for path in ("oal/config.py", "oal/data/__init__.py", "oal/configs/digits.yaml", "jobs/pipeline.py",
                 "pyproject.toml", "cluster/runtime_env.yaml", "oal/weights/fashion-ldm/model.safetensors"):
        assert not excluded(REPO / path), path
    secret = [k for k in env.get("env_vars", {}) if re.search(r"SECRET|PASSWORD|ACCESS_KEY|_TOKEN$", k)]
    assert not secret, "credentials do not belong in a runtime_env (it is shown in the dashboard)"


def test_aws_launcher_has_an_autoscaling_gpu_group():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load("aws.yaml")
    validate_config(prepare_config(cfg))  # Ray's schema and consistency checks, as `ray up` runs them
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1
    assert gpu[0]["min_workers"] == 0 and 1 <= gpu[0]["max_workers"] <= cfg["max_workers"]
    assert cfg["provider"]["type"] == "aws"
    assert any("pip install" in c and "oal" in c for c in cfg["setup_commands"])
    assert "." in cfg["file_mounts"].values()  # the repository being installed
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = next(c for c in cmds if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and "MLFLOW_TRACKING_URI=" in start
        # the jobs' MLflow login, from Secrets Manager through the node's role, never written in the file
        assert 'MLFLOW_TRACKING_USERNAME=oal-jobs MLFLOW_TRACKING_PASSWORD="$(python -c "$SECRET" oal/mlflow-jobs)"' \
            in start
        for c in cmds:  # each command parses as the launcher's shell will run it
            r = subprocess.run(["bash", "-n", "-c", c], capture_output=True, text=True)
            assert r.returncode == 0, (c, r.stderr)
    server = next(c for c in cfg["head_start_ray_commands"] if "mlflow server" in c)
    assert "--app-name basic-auth" in server and "MLFLOW_AUTH_CONFIG_PATH=" in server
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$(python -c "$SECRET" oal/mlflow-admin)"' in server
    assert "cluster/stack.py mlflow-user" in server
    commands = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert commands.count("PASSWORD=") >= 4
    assert re.findall(r"(?:PASSWORD|SECRET_KEY)=(?!\"\$\(python -c \"\$SECRET\")", commands) == []  # no literal


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_raycluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.60")
    assert spec["authOptions"]["mode"] == "token"
    head = _containers(spec["headGroupSpec"]["template"])
    assert head and all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in head)
    groups = spec["workerGroupSpecs"]
    gpu = [g for g in groups if any(str(c["resources"]["limits"].get("nvidia.com/gpu")) == "1"
                                    for c in _containers(g["template"]))]
    assert gpu and all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in gpu)
    for c in head + [c for g in groups for c in _containers(g["template"])]:
        assert {"secretRef": {"name": "oal-env"}} in c["envFrom"]  # credentials + MLFLOW_TRACKING_URI from a Secret


def test_kuberay_raycluster_has_head_and_gpu_workers():
    rc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_raycluster_spec(rc["spec"])


def test_kuberay_rayjob_runs_the_pipeline():
    rj = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (rj["apiVersion"], rj["kind"]) == ("ray.io/v1", "RayJob")
    assert rj["spec"]["entrypoint"] == ENTRYPOINT
    # the entrypoint as the job's shell splits it and as jobs.pipeline parses it: a config that loads
    from jobs import common

    argv = shlex.split(rj["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"] and (REPO / "jobs" / "pipeline.py").exists()
    cfg = common.load(common.parser("pipeline").parse_args(argv[3:]))
    assert cfg.data.benchmark == "digits" and cfg.cluster.use_gpu and cfg.cluster.autoscaling
    # the runtime env as Ray reads it (RuntimeEnv validates each field), with the job env of runtime_env.yaml
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load(rj["spec"]["runtimeEnvYAML"]))
    assert env.env_vars() == load("runtime_env.yaml")["env_vars"]
    assert "working_dir" not in env  # the image has the package; nothing is uploaded
    _check_raycluster_spec(rj["spec"]["rayClusterSpec"])


def test_readme_commands_match_the_files():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("python -m cluster.stack up", "ray up cluster/aws.yaml", "--runtime-env cluster/runtime_env.yaml",
                   ENTRYPOINT, "kubectl apply -f cluster/kuberay/raycluster.yaml",
                   "kubectl apply -f cluster/kuberay/rayjob.yaml"):
        assert needle in text, needle


def _env_entries(node) -> list[dict]:
    """Every entry of every `env:` list in a parsed manifest."""
    if isinstance(node, dict):
        found = [e for e in node.get("env", []) if isinstance(e, dict)] if isinstance(node.get("env"), list) else []
        return found + [e for v in node.values() for e in _env_entries(v)]
    if isinstance(node, list):
        return [e for v in node for e in _env_entries(v)]
    return []


def test_cloud_docs_take_secrets_from_files_or_a_store():
    """KubeRay and AWS: no secret on a command line (`--from-literal=`, `--secret-string VALUE`) or in a manifest;
    Secrets made from files; the MLflow user Job reads the admin password from a Secret."""
    docs = {p.relative_to(REPO).as_posix(): p.read_text() for p in
            [CLUSTER / "README.md", CLUSTER / "aws.yaml", *sorted((CLUSTER / "kuberay").glob("*.yaml")), REPO / "README.md"]}
    for name, text in docs.items():
        assert "--from-literal=" not in text, name
        assert re.findall(r"--secret-string\s+(?!file://)", text) == [], name
    assert "--from-env-file=oal-env.env" in docs["cluster/README.md"] and "--from-file=password=" in docs["cluster/README.md"]
    assert "kubectl apply -f cluster/kuberay/mlflow-user.yaml" in docs["cluster/README.md"]
    secretish = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN")
    manifests = sorted((CLUSTER / "kuberay").glob("*.yaml"))
    assert len(manifests) == 3
    for path in manifests:
        for entry in _env_entries(yaml.safe_load(path.read_text())):
            if secretish.search(entry["name"]):
                assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), (path.name, entry)
    job = yaml.safe_load((CLUSTER / "kuberay" / "mlflow-user.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:4] == ["python", "-m", "cluster.stack", "mlflow-user"]
    assert {"secretRef": {"name": "oal-env"}} in container["envFrom"]
    assert container["env"] == [{"name": "MLFLOW_AUTH_ADMIN_PASSWORD", "valueFrom": {
        "secretKeyRef": {"name": "oal-mlflow-admin", "key": "password"}}}]
    assert "cluster/stack.py" in (CLUSTER / "Dockerfile").read_text()  # the image can run `python -m cluster.stack`
    # the launcher: the token copied to the nodes is made its owner's alone there
    assert any("chmod 600 ~/.ray/auth_token" in c for c in load("aws.yaml")["setup_commands"])


# ------------------------------------------------------------------ the stack's own checks (no Ray)


def test_port_taken_by_something_else_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        st = Stack(state_dir=tmp_path, s3_port=port, mlflow_port=free_ports(1)[0], echo=lambda _: None)
        with pytest.raises(StackError, match=rf"port {port} \(s3: s3_port\) is already in use"):
            st.up(["s3"])
    assert not (tmp_path / "s3.pid").exists()


def test_a_disk_too_full_for_the_s3_server_is_named_before_it_starts(tmp_path, monkeypatch):
    """SeaweedFS stores nothing on a disk with under 1% free (its uploads then fail with HTTP 500 or hang): `up`
    refuses to start it there, naming the folder, the room and the way out; `status` warns. The disk's usage is
    made up (filling a real one takes a mount, root only); the room is real on the machine's disk otherwise."""
    from collections import namedtuple

    from cluster.services import s3

    assert s3.disk_shortage(tmp_path / "s3") is None  # this machine's disk has room
    usage = namedtuple("usage", "total used free")
    gib = 2**30
    monkeypatch.setattr(s3.shutil, "disk_usage", lambda _: usage(100 * gib, 99.5 * gib, gib // 2))
    lines: list[str] = []
    st = Stack(state_dir=tmp_path, s3_port=free_ports(1)[0], echo=lines.append)
    with pytest.raises(StackError) as err:
        st.up(["s3"])
    msg = str(err.value)
    assert f"{tmp_path / 's3'}" in msg and "512 MiB free of 102,400 MiB" in msg and "at least 1,280 MiB" in msg
    assert "--state-dir or OAL_STACK_DIR" in msg
    assert not (tmp_path / "s3.pid").exists()
    assert st.describe()[-1] == f"warning: {msg}"
    monkeypatch.setattr(s3.shutil, "disk_usage", lambda _: usage(100 * gib, 98 * gib, 2 * gib))
    assert s3.disk_shortage(tmp_path / "s3") is None and not st.describe()[-1].startswith("warning")


@pytest.mark.stack
def test_s3_alone_up_down_idempotent(tmp_path):
    lines: list[str] = []
    st = Stack(state_dir=tmp_path, s3_port=free_ports(1)[0], echo=lines.append)
    try:
        env = st.up(["s3"])
        assert st.status() == {"s3": True, "mlflow": False, "ray": False}
        assert env["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{st.s3_port}"
        assert (tmp_path / "env").stat().st_mode & 0o077 == 0
    finally:
        st.down()
    st.down()  # again: nothing to do
    assert lines[-3:] == ["ray    not running", "mlflow not running", "s3     not running"]
    assert not any(st.status().values()) and not (tmp_path / "s3.pid").exists()
    ports = [*json.loads((tmp_path / "s3" / "ports.json").read_text()).values(), st.s3_port]
    assert ports and not [p for p in Path("/tmp").glob("seaweedfs-*.sock") if int(p.stem.rsplit("-", 1)[-1]) in ports]
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the server's closed connections may be in TIME_WAIT
        s.bind(("127.0.0.1", st.s3_port))  # nothing listens on the port any more


# ------------------------------------------------------------------ the real stack


def _s3(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


@pytest.mark.stack
def test_s3_bucket_exists(s3_mlflow: RunningStack):
    s3 = _s3(s3_mlflow.env)
    s3.head_bucket(Bucket=s3_mlflow.env["OAL_S3_BUCKET"])
    assert s3_mlflow.env["OAL_S3_BUCKET"] in [b["Name"] for b in s3.list_buckets()["Buckets"]]


@pytest.mark.stack
def test_mlflow_logs_a_param_and_an_artifact_into_s3(s3_mlflow: RunningStack, tmp_path):
    from mlflow import MlflowClient

    env = s3_mlflow.env
    with urllib.request.urlopen(f"{env['MLFLOW_TRACKING_URI']}/health", timeout=10) as r:
        assert r.read().decode().strip() == "OK"
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment(f"test-cluster-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "alpha", "0.5")
    note = tmp_path / "note.txt"
    note.write_text("outliers at the boundary")
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)

    assert client.get_run(run.info.run_id).data.params == {"alpha": "0.5"}
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not S3 from the client
    key = f"artifacts/{exp}/{run.info.run_id}/artifacts/note.txt"
    body = _s3(env).get_object(Bucket=env["OAL_S3_BUCKET"], Key=key)["Body"].read()
    assert body == b"outliers at the boundary"


@pytest.mark.stack
def test_mlflow_answers_only_a_logged_in_user(s3_mlflow: RunningStack):
    from cluster.stack import _send

    env, stack = s3_mlflow.env, s3_mlflow.stack
    base = env["MLFLOW_TRACKING_URI"]
    search = f"{base}/api/2.0/mlflow/experiments/search"
    jobs = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    assert jobs[0] == "oal-jobs" and len(jobs[1]) >= 24 and jobs[1] != stack.secret("admin")

    def anonymous(url: str, data: bytes | None = None) -> int:
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert anonymous(search, b'{"max_results": 1}') == 401  # the REST API
    assert anonymous(f"{base}/") == 401  # the UI
    assert anonymous(f"{base}/api/2.0/mlflow-artifacts/artifacts") == 401  # the S3 artifact proxy
    assert anonymous(f"{base}/health") == 200  # what the stack's and oal.tracking's health checks read
    assert _send(search, "POST", {"max_results": 1}, (jobs[0], "not-the-password"))[0] == 401
    assert _send(search, "POST", {"max_results": 1}, jobs)[0] == 200
    # the jobs' user is no admin: it cannot create users; the admin can
    user = {"username": f"probe-{uuid.uuid4().hex[:6]}", "password": "a-long-enough-password"}
    assert _send(f"{base}/api/2.0/mlflow/users/create", "POST", user, jobs)[0] == 403
    assert _send(f"{base}/api/2.0/mlflow/users/create", "POST", user, ("admin", stack.secret("admin")))[0] == 200
    assert oct((stack.state_dir / "secrets.json").stat().st_mode & 0o777) == "0o600"
    assert oct((stack.state_dir / "env").stat().st_mode & 0o777) == "0o600"


@pytest.mark.stack
def test_an_experiment_the_jobs_user_may_not_write_is_one_clear_error(s3_mlflow: RunningStack, tmp_path):
    """An experiment created by another user (here the admin; the server's default permission is READ): the
    pipeline's first write is refused, and the error names the user and the experiment, not the password."""
    from cluster.stack import _send
    from oal.config import load_config
    from oal.tracking import Tracker

    env, stack = s3_mlflow.env, s3_mlflow.stack
    base, name = env["MLFLOW_TRACKING_URI"], f"admins-only-{uuid.uuid4().hex[:6]}"
    status, _ = _send(f"{base}/api/2.0/mlflow/experiments/create", "POST", {"name": name},
                      ("admin", stack.secret("admin")))
    assert status == 200
    cfg = load_config("digits", [f"output_dir={tmp_path}"])
    with pytest.raises(RuntimeError) as err:
        with Tracker(base, name, system_metrics=False).pipeline_run(cfg):
            pytest.fail("a run was started in an experiment this user may only read")
    msg = str(err.value)
    assert f"refused user 'oal-jobs' (MLFLOW_TRACKING_USERNAME) access to experiment '{name}' (HTTP 403)" in msg
    assert "tracking.experiment=NAME" in msg and env["MLFLOW_TRACKING_PASSWORD"] not in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # one error, not MLflow's traceback too


@pytest.mark.stack
@pytest.mark.ray
def test_ray_job_succeeds_with_the_token(ray_head: RunningStack):
    from ray.job_submission import JobSubmissionClient

    assert os.environ["RAY_AUTH_MODE"] == "token"
    client = JobSubmissionClient()  # address from RAY_API_SERVER_ADDRESS, token from ~/.ray/auth_token
    job = client.submit_job(entrypoint='python -c "print(42)"')
    assert wait_job(client, job) == "SUCCEEDED", client.get_job_logs(job)
    assert "42" in client.get_job_logs(job).split()


@pytest.mark.stack
@pytest.mark.ray
def test_ray_job_gets_the_repo_and_the_stack_env(stack: RunningStack):
    """The runtime_env the README gives: the repo uploaded without .venv/runs, and MLflow/S3 settings
    inherited from the head (no credentials in the runtime_env)."""
    from ray.job_submission import JobSubmissionClient

    runtime_env = {**load("runtime_env.yaml"), "working_dir": str(REPO)}
    probe = ("import json, os; print('PROBE', json.dumps({'ls': sorted(os.listdir('.')), "
             "'env': {k: os.environ.get(k) for k in ('MLFLOW_TRACKING_URI', 'OAL_S3_BUCKET', 'TQDM_DISABLE', "
             "'MLFLOW_TRACKING_USERNAME')}, 'password_set': bool(os.environ.get('MLFLOW_TRACKING_PASSWORD'))}))")
    client = JobSubmissionClient()
    job = client.submit_job(entrypoint=f'python -c "{probe}"', runtime_env=runtime_env)
    assert wait_job(client, job) == "SUCCEEDED", client.get_job_logs(job)
    line = next(x for x in client.get_job_logs(job).splitlines() if x.startswith("PROBE "))
    seen = json.loads(line.removeprefix("PROBE "))
    assert {"oal", "jobs", "cluster", "pyproject.toml"} <= set(seen["ls"])
    assert not {".venv", ".git", "runs", ".stack"} & set(seen["ls"])
    assert seen["env"] == {"MLFLOW_TRACKING_URI": stack.env["MLFLOW_TRACKING_URI"],
                           "OAL_S3_BUCKET": stack.env["OAL_S3_BUCKET"], "TQDM_DISABLE": "1",
                           "MLFLOW_TRACKING_USERNAME": "oal-jobs"}
    assert seen["password_set"]  # the job logs in to MLflow with the jobs' user (from the head, not runtime_env)


@pytest.mark.stack
@pytest.mark.ray
def test_a_driver_joins_the_head_through_ray_address(stack: RunningStack):
    """RAY_ADDRESS is the GCS address, so ray.init("auto") finds this head even beside other local Ray instances."""
    import ray

    # A driver another test left connected joined through the same RAY_ADDRESS: check that one instead.
    ours = not ray.is_initialized()
    if ours:
        ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
    try:
        assert ray.get_runtime_context().gcs_address.endswith(f":{stack.stack.ray_gcs_port}")
        assert ray.cluster_resources()["CPU"] == stack.stack.num_cpus

        @ray.remote(num_cpus=0)
        def tracking_uri() -> str | None:
            return os.environ.get("MLFLOW_TRACKING_URI")

        assert ray.get(tracking_uri.remote(), timeout=60) == stack.env["MLFLOW_TRACKING_URI"]
    finally:
        if ours:
            ray.shutdown()


@pytest.mark.stack
@pytest.mark.ray
def test_ray_refuses_clients_without_the_token(ray_head: RunningStack):
    url = ray_head.env["RAY_API_SERVER_ADDRESS"] + "/api/jobs/"
    for headers, code, text in (({}, 401, "Missing authentication token"),
                                ({"Authorization": "Bearer not-the-token"}, 403, "Invalid authentication token")):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
        assert e.value.code == code and text in e.value.read().decode()
    # The SDK in a fresh process whose environment lacks RAY_AUTH_MODE=token: refused before submitting.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    script = ("from ray.job_submission import JobSubmissionClient\n"
              "try:\n    JobSubmissionClient()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("AuthenticationError Authentication required: Unauthorized: Missing authentication token"), out


@pytest.mark.stack
@pytest.mark.ray
def test_up_again_starts_nothing_and_status_shows_all_up(stack: RunningStack):
    st = stack.stack
    before = st.pids()
    assert all(before.values())
    lines: list[str] = []
    again = Stack(**{**{f: getattr(st, f) for f in st.__dataclass_fields__}, "echo": lines.append})
    assert again.up() == stack.env
    assert again.pids() == before
    assert [x.split()[:2] for x in lines[:3]] == [[name, "already"] for name in SERVICES]
    assert st.status() == {"s3": True, "mlflow": True, "ray": True}

    # The CLI on the same state dir: the recorded ports, one line per service, exit 0.
    cli = [sys.executable, "-m", "cluster.stack"]
    for args, word in ((["up"], "already running"), (["status"], "up")):
        r = subprocess.run([*cli, *args, "--state-dir", str(st.state_dir)], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert [x.split()[0] for x in r.stdout.splitlines()[:3]] == list(SERVICES) and r.stdout.count(word) >= 3
    assert st.pids() == before
    r = subprocess.run([*cli, "env", "--state-dir", str(st.state_dir)], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    exported = dict(x.removeprefix("export ").split("=", 1) for x in r.stdout.splitlines() if x.startswith("export "))
    assert exported == stack.env


# ------------------------------------------------------------------ what the stack keeps to itself (issue 31)

# Sockets of the stack's processes that listen beyond loopback, and what protects each: README.md's stack paragraph
# names the same (none: Ray's node address is 127.0.0.1, so its GCS, raylet, workers and agents bind loopback too).
NOT_ON_LOOPBACK: dict[str, str] = {}


def _is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _listening(pids: list[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of these processes and all their descendants."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            procs[p.pid] = p
    found = []
    for p in procs.values():
        try:
            name = p.name()
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found += [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def test_loopback_helper_tells_loopback_from_the_rest():
    assert all(map(_is_loopback, ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1")))
    assert not any(map(_is_loopback, ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "10.0.0.1")))


@pytest.mark.stack
@pytest.mark.ray
def test_every_socket_of_the_stack_listens_on_loopback(stack: RunningStack):
    """The S3 server, MLflow and the Ray head with a worker running a task: each listening socket of their process
    trees is on 127.0.0.0/8 (or named in the README with what protects it)."""
    import ray

    st = stack.stack
    ours = not ray.is_initialized()
    if ours:
        ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
    try:
        assert ray.get_runtime_context().get_node_id()  # joined through RAY_ADDRESS (127.0.0.1) like a job driver
        assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}

        @ray.remote(num_cpus=0)
        def worker_pid() -> int:
            return os.getpid()

        assert ray.get(worker_pid.remote(), timeout=60) > 0  # a worker process (its own gRPC server) is up
        pids = [p for p in st.pids().values() if p is not None]
        assert len(pids) == 3
        sockets = _listening(pids)
    finally:
        if ours:
            ray.shutdown()
    ports = {port for _, port, _ in sockets}
    # the enumeration sees the services' known ports, and far more (Ray's raylet, GCS, workers, agents, SeaweedFS)
    assert {st.s3_port, st.mlflow_port, st.ray_dashboard_port, st.ray_gcs_port, st.ray_client_port,
            st.ray_agent_port} <= ports
    assert len(sockets) >= 20, sockets
    assert {"gcs_server", "raylet", "weed"} <= {name for _, _, name in sockets}
    outside = [s for s in sockets if not _is_loopback(s[0]) and s[2] not in NOT_ON_LOOPBACK]
    assert outside == [], f"listening beyond loopback: {outside}"
    # what README.md promises: loopback, and no exemption (else it names each, and NOT_ON_LOOPBACK lists them)
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "listens on 127.0.0.1 (none exempt)" in readme and not NOT_ON_LOOPBACK


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.stack
@pytest.mark.ray
def test_stack_files_are_its_owners_alone(stack: RunningStack):
    """The Ray token, MLflow's user store (password hashes) and tracking database, the secrets and `env`: 0600;
    the state dir 0700; and no file or folder that the stack or its services wrote under it (S3 volumes, logs,
    SQLite journals) is open to group or others."""
    from cluster.stack import ray_token_path

    sd = stack.state_dir
    # an object written now: the S3 server creates its volume files after the stack started
    _s3(stack.env).put_object(Bucket=stack.env["OAL_S3_BUCKET"], Key=f"mode-{uuid.uuid4().hex[:6]}", Body=b"x" * 999)
    token = ray_token_path()
    assert token is not None and _mode(token) == 0o600
    assert _mode(sd) == 0o700
    for name in ("secrets.json", "env", "mlflow.db", "mlflow_auth.db"):
        assert _mode(sd / name) == 0o600, name
    assert _mode(sd / "s3") == 0o700 and any((sd / "s3").rglob("*.dat"))  # the S3 server's volumes are in there
    opened = [(str(p.relative_to(sd)), oct(_mode(p))) for p in sd.rglob("*")
              if not p.is_symlink() and not p.is_socket() and _mode(p) & 0o077]
    # One exception, SeaweedFS's own: it sets its volume-info files (s3/*.vif: a volume's version, size, replication;
    # no object data) to 0644 whatever the umask. They lie in s3/, which only the owner may enter.
    vif = [(name, mode) for name, mode in opened if name.startswith("s3/") and name.endswith(".vif")]
    assert opened == vif
    assert all(b"x" * 999 not in (sd / name).read_bytes() and len((sd / name).read_bytes()) < 4096 for name, _ in vif)
    assert len(list(sd.rglob("*"))) > 20  # the walk saw the services' files


def test_ray_token_is_written_private_and_an_open_one_is_closed(tmp_path, monkeypatch):
    from cluster.stack import _ensure_ray_token, _ray_token

    path = tmp_path / "home" / ".ray" / "auth_token"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert _ensure_ray_token() is None  # made: nothing to report
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    token = _ray_token()
    assert token is not None and len(token) == 64
    path.chmod(0o644)  # as `ray get-auth-token --generate` writes it
    said = _ensure_ray_token()
    assert said is not None and str(path) in said and "644" in said
    assert _mode(path) == 0o600 and _ray_token() == token  # same token, closed


def test_state_dir_and_its_secrets_closed_on_up(tmp_path):
    """A state dir an older stack left open (0755 dir, 0644 databases and secrets) is closed by `up` before it
    starts anything."""
    sd = tmp_path / "old"
    sd.mkdir(mode=0o755)
    sd.chmod(0o755)
    for name in ("secrets.json", "mlflow.db", "mlflow_auth.db", "mlflow.db-journal", "env"):
        (sd / name).write_text("{}" if name == "secrets.json" else "x")
        (sd / name).chmod(0o644)
    st = Stack(state_dir=sd, echo=lambda _: None)
    st._secure()
    assert _mode(sd) == 0o700
    assert {p.name: _mode(p) for p in sd.iterdir()} == dict.fromkeys(
        ("secrets.json", "mlflow.db", "mlflow_auth.db", "mlflow.db-journal", "env"), 0o600)
    st.secret("s3")  # a secret added later is written 0600 too
    assert _mode(sd / "secrets.json") == 0o600


def test_the_callers_aws_keys_stay_out_of_the_stack_unless_asked(tmp_path, monkeypatch):
    mine = {"AWS_ACCESS_KEY_ID": "AKIAMYOWNKEY0000", "AWS_SECRET_ACCESS_KEY": "my-own-secret-key-0000",
            "AWS_SESSION_TOKEN": "my-own-session-token", "AWS_PROFILE": "my-profile"}
    for k, v in mine.items():
        monkeypatch.setenv(k, v)
    st = Stack(state_dir=tmp_path / "s", echo=lambda _: None)
    env = st.env()
    assert env["AWS_ACCESS_KEY_ID"] == "oal-stack"
    assert env["AWS_SECRET_ACCESS_KEY"] == json.loads((tmp_path / "s" / "secrets.json").read_text())["s3"]
    assert len(env["AWS_SECRET_ACCESS_KEY"]) >= 32
    # not in `env`, nor in any service's environment (the Ray head's is every job's)
    leaked = {name: [k for k, v in st._command(name)[1].items() if v in mine.values()] for name in SERVICES}
    assert leaked == {"s3": [], "mlflow": [], "ray": []}
    assert not any(v in st.env_text() for v in mine.values())
    assert st._command("ray")[1]["AWS_ACCESS_KEY_ID"] == "oal-stack"  # the stack's own, for the jobs
    # the same stack again: the same generated secret
    assert Stack(state_dir=tmp_path / "s").env()["AWS_SECRET_ACCESS_KEY"] == env["AWS_SECRET_ACCESS_KEY"]

    # asked for: the caller's keys become the stack's S3 credentials, in `env` and the services
    asked = Stack(state_dir=tmp_path / "p", pass_aws_env=True, echo=lambda _: None)
    assert (asked.env()["AWS_ACCESS_KEY_ID"], asked.env()["AWS_SECRET_ACCESS_KEY"]) == (
        mine["AWS_ACCESS_KEY_ID"], mine["AWS_SECRET_ACCESS_KEY"])
    assert asked._command("s3")[1]["AWS_SECRET_ACCESS_KEY"] == mine["AWS_SECRET_ACCESS_KEY"]
    # and the CLI flag sets it
    r = subprocess.run([sys.executable, "-m", "cluster.stack", "env", "--state-dir", str(tmp_path / "c")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert "oal-stack" in r.stdout and not any(v in r.stdout for v in mine.values())
    r = subprocess.run([sys.executable, "-m", "cluster.stack", "env", "--pass-aws-env", "--state-dir",
                        str(tmp_path / "c")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert f"AWS_SECRET_ACCESS_KEY={mine['AWS_SECRET_ACCESS_KEY']}" in r.stdout


@pytest.mark.stack
def test_s3_server_checks_credentials_and_serves_pyarrow(s3_mlflow: RunningStack):
    """The S3 server refuses a wrong key and anonymous requests; pyarrow's S3FileSystem (Ray Train's storage) writes,
    lists, reads ranges and deletes through it."""
    import boto3
    import pyarrow.fs as pafs
    from botocore.exceptions import ClientError

    env, bucket = s3_mlflow.env, s3_mlflow.env["OAL_S3_BUCKET"]
    wrong = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                         aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key="not-the-key")
    with pytest.raises(ClientError) as e:
        wrong.list_objects_v2(Bucket=bucket)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(urllib.error.HTTPError) as h:
        urllib.request.urlopen(f"{env['MLFLOW_S3_ENDPOINT_URL']}/{bucket}/", timeout=10)
    assert h.value.code == 403

    fs = pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                           endpoint_override=env["MLFLOW_S3_ENDPOINT_URL"], scheme="http",
                           region=env["AWS_DEFAULT_REGION"])
    root = f"{bucket}/pyarrow-{uuid.uuid4().hex[:8]}"
    blob = os.urandom(11 * 1024 * 1024)  # above pyarrow's part size: a multipart upload
    with fs.open_output_stream(f"{root}/ckpt_0/model.pt") as f:
        f.write(blob)
    with fs.open_output_stream(f"{root}/ckpt_0/meta.json") as f:
        f.write(b"{}")
    files = {i.path: i.size for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File}
    assert files == {f"{root}/ckpt_0/model.pt": len(blob), f"{root}/ckpt_0/meta.json": 2}
    with fs.open_input_file(f"{root}/ckpt_0/model.pt") as f:
        assert f.read() == blob
        f.seek(12345)
        assert f.read(100) == blob[12345:12445]
    fs.delete_dir(f"{root}/ckpt_0")
    assert not [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
                if i.type == pafs.FileType.File]


def _objects(s3, bucket: str) -> dict[str, tuple[str, bytes]]:
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    out = {}
    for key in keys:
        got = s3.get_object(Bucket=bucket, Key=key)
        out[key] = (got["ETag"], got["Body"].read())
    return out


@pytest.mark.stack
@pytest.mark.slow
def test_s3_objects_and_mlflow_artifacts_survive_down_up_and_a_kill(tmp_path, monkeypatch):
    """Objects put (small, empty, multipart) and an artifact logged through MLflow's proxy: after `down` and `up`,
    and after the S3 server is killed (SIGKILL, as in a crash or a reboot) and `up` again, the bucket lists the same
    keys with the same bytes and ETags, and MLflow hands back the artifact."""
    import io
    import signal

    from boto3.s3.transfer import TransferConfig
    from mlflow import MlflowClient

    s3_port, mlflow_port = free_ports(2)
    st = Stack(state_dir=tmp_path / "stack", s3_port=s3_port, mlflow_port=mlflow_port, echo=lambda _: None)
    try:
        env = st.up(["s3", "mlflow"])
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # this stack's login, not the session's
            monkeypatch.setenv(k, env[k])
        s3 = _s3(env)
        bucket = env["OAL_S3_BUCKET"]
        s3.put_object(Bucket=bucket, Key="runs/digits/teacher/stage.json", Body=b'{"stage": "teacher"}')
        s3.put_object(Bucket=bucket, Key="runs/digits/empty", Body=b"")
        big = os.urandom(11 * 1024 * 1024)
        s3.upload_fileobj(io.BytesIO(big), bucket, "runs/digits/teacher/checkpoint.pt",
                          Config=TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20))
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        run = client.create_run(client.create_experiment("survives"))
        note = tmp_path / "model.bin"
        note.write_bytes(os.urandom(300_000))
        client.log_artifact(run.info.run_id, str(note), "student")
        before = _objects(s3, bucket)
        assert len(before) == 4 and before["runs/digits/teacher/checkpoint.pt"][1] == big
        assert before["runs/digits/teacher/checkpoint.pt"][0].endswith('-3"')  # S3's multipart ETag: 3 parts

        def same_after(restart) -> None:
            restart()
            env2 = st.up(["s3", "mlflow"])
            assert env2 == env
            assert _objects(_s3(env2), bucket) == before
            got = MlflowClient(env2["MLFLOW_TRACKING_URI"]).download_artifacts(
                run.info.run_id, "student/model.bin", str(tmp_path / f"dl-{uuid.uuid4().hex[:6]}"))
            assert Path(got).read_bytes() == note.read_bytes()

        def down_all() -> None:
            st.down()
            assert not any(st.status().values())
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no server
                s.bind(("127.0.0.1", s3_port))  # nothing serves the bucket any more

        def kill_s3() -> None:
            pid = st.pids()["s3"]
            assert pid is not None
            os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while st.pids()["s3"] is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert st.pids()["s3"] is None

        same_after(down_all)
        same_after(kill_s3)
        # `up` waits for the master to locate every volume on disk (a SIGKILLed server's gateway answers first and
        # serves "volume N not found" for a moment): one it cannot locate keeps the server "starting".
        stray = tmp_path / "stack" / "s3" / "oal_999.dat"
        stray.write_bytes(b"")
        assert st._probe("s3") == (False, "volumes 999 not located yet")
        stray.unlink()
        assert st._probe("s3") == (True, "HTTP 200")
    finally:
        st.down()
