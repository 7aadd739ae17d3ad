"""The local stack on loopback: an S3 server (SeaweedFS, objects on disk under the state dir), an MLflow server
(artifacts in that S3) and a Ray head (token authentication on).

    python -m cluster.stack up [--services s3,mlflow,ray]   start what is not running, wait until healthy
    python -m cluster.stack status                          one line per service; exit 1 if one is down
    python -m cluster.stack env                             the client environment, as `export` lines
    python -m cluster.stack secret admin|jobs               a generated MLflow password
    python -m cluster.stack down                            stop what `up` started (idempotent)

MLflow runs its basic-auth app: anonymous requests get 401 (only /health answers). On first `up` an admin password
and a password for the jobs' user (`oal-jobs`) are generated into `<state-dir>/secrets.json` (mode 600); `env` hands
the jobs' user to clients as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, and the Ray head passes it on
to every job. The admin password reaches only the MLflow server's environment (`python -m cluster.stack secret
admin` prints it, for the UI's user management).

State (pid files, one log per service, `env`, `stack.json`, the S3 server's data in `s3/`, MLflow's databases) lives
in `--state-dir`, default `<repo>/.stack` (env OAL_STACK_DIR), readable by its owner only: the folder is 0700, the
services run with umask 077, and the token file, databases, secrets and `env` are 0600.

S3 credentials are the stack's own (access key `oal-stack`, a generated secret in secrets.json): the caller's
AWS_* variables are neither handed to the services nor written into `env`, unless `up --pass-aws-env` asks for
the caller's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY to be the stack's S3 credentials.

Everything listens on 127.0.0.1: Ray's node address is loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which is
also in `env`: a driver without it looks for the head on the machine's network address).

Ports come from flags, else OAL_S3_PORT, OAL_MLFLOW_PORT, OAL_RAY_DASHBOARD_PORT,
OAL_RAY_GCS_PORT, OAL_RAY_CLIENT_PORT, OAL_RAY_AGENT_PORT, else the defaults below.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SERVICES = ("s3", "mlflow", "ray")
REGION = "us-east-1"
# Port fields: the service that owns each and its environment variable.
PORTS = {
    "s3_port": ("s3", "OAL_S3_PORT"),
    "mlflow_port": ("mlflow", "OAL_MLFLOW_PORT"),
    "ray_dashboard_port": ("ray", "OAL_RAY_DASHBOARD_PORT"),
    "ray_gcs_port": ("ray", "OAL_RAY_GCS_PORT"),
    "ray_client_port": ("ray", "OAL_RAY_CLIENT_PORT"),
    "ray_agent_port": ("ray", "OAL_RAY_AGENT_PORT"),
}
# What `up` records in stack.json: enough for `status`, `env` and `down` to find the running stack.
RECORDED = (*PORTS, "num_cpus", "bucket", "ray_temp_dir", "pass_aws_env")
# Ray hands its worker processes ports from this range (its default), so its fixed ports must lie outside.
RAY_WORKER_PORTS = range(10002, 20000)
RAY_DEFAULT_TOKEN = Path.home() / ".ray" / "auth_token"
STOP_WAIT_S = 45.0  # `ray start --block` drains for up to 30 s on SIGTERM
UMASK = 0o077  # every file the stack and its services create is its owner's alone
S3_ACCESS_KEY = "oal-stack"  # the S3 server's access key id (its secret key is generated: secrets.json)
# SeaweedFS's internal servers (`weed mini`), each on a port of its own; their gRPC ports too (the admin server's is
# its HTTP port + 10000, which its maintenance worker assumes). Iceberg, Lance and WebDAV are off.
WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port.grpc", "admin.port")
WEED_GRPC_OFFSET = 10000
AUTH_CACHE_SECONDS = 300  # MLflow basic-auth: how long a checked password is remembered (see _auth_config)
# Health checks only ever talk to loopback: never through a proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StackError(RuntimeError):
    """A service could not be started or reached; the message names it and says why."""


@dataclass
class Stack:
    state_dir: Path = REPO / ".stack"
    s3_port: int = 9000
    mlflow_port: int = 5050
    ray_dashboard_port: int = 8265
    ray_gcs_port: int = 6379
    ray_client_port: int = 10001
    ray_agent_port: int = 52365
    num_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    bucket: str = "oal"
    ray_temp_dir: Path | None = None  # None: Ray's default, /tmp/ray
    # Credentials of the local S3 server. None: the stack's own (S3_ACCESS_KEY, a generated secret), or with
    # pass_aws_env the caller's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    pass_aws_env: bool = False
    timeout: float = 120.0  # per service; MLflow alone needs ~15-20 s to answer on 2 cores
    jobs_user: str = "oal-jobs"  # the MLflow user jobs and clients log in as (basic auth)
    echo: Callable[[str], None] = field(default=print, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.ray_temp_dir = Path(self.ray_temp_dir) if self.ray_temp_dir else None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_env(cls, **overrides: object) -> Stack:
        """Defaults, then the OAL_* environment variables, then `overrides` (None values are ignored)."""
        env = os.environ
        kw: dict[str, object] = {}
        if env.get("OAL_STACK_DIR"):
            kw["state_dir"] = Path(env["OAL_STACK_DIR"])
        numeric = {name: var for name, (_, var) in PORTS.items()} | {"num_cpus": "OAL_RAY_NUM_CPUS"}
        for name, var in numeric.items():
            if env.get(var):
                try:
                    kw[name] = int(env[var])
                except ValueError:
                    raise StackError(f"{var}={env[var]!r} is not an integer") from None
        if env.get("OAL_S3_BUCKET"):
            kw["bucket"] = env["OAL_S3_BUCKET"]
        if env.get("OAL_RAY_TEMP_DIR"):
            kw["ray_temp_dir"] = Path(env["OAL_RAY_TEMP_DIR"])
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)  # type: ignore[arg-type]

    def recorded(self) -> Stack | None:
        """The stack `up` recorded in this state dir, or None."""
        path = self.state_dir / "stack.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return replace(self, **{k: data[k] for k in RECORDED if k in data})

    # ---------------------------------------------------------------- public API

    def env(self) -> dict[str, str]:
        """What a client needs: MLflow, S3 endpoint and credentials, the bucket, the Ray job server."""
        s3 = f"http://{HOST}:{self.s3_port}"
        access_key, secret_key = self.s3_credentials()
        return {
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{self.mlflow_port}",
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "AWS_ENDPOINT_URL_S3": s3,  # boto3 and pyarrow clients without an explicit endpoint
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "OAL_S3_BUCKET": self.bucket,
            # `ray job submit` and JobSubmissionClient read RAY_API_SERVER_ADDRESS first; ray.init() refuses an
            # http:// RAY_ADDRESS (Ray 2.60), so RAY_ADDRESS is the GCS address a driver can join.
            "RAY_API_SERVER_ADDRESS": f"http://{HOST}:{self.ray_dashboard_port}",
            "RAY_ADDRESS": f"{HOST}:{self.ray_gcs_port}",
            "RAY_AUTH_MODE": "token",
            # The head's node address is 127.0.0.1 (Ray turns a --node-ip-address of 127.0.0.1 into the machine's
            # network address unless this is off); a driver needs it too, or it looks for the head on that address.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # MLflow's basic auth: the jobs' user (the clients of mlflow read these two variables)
            "MLFLOW_TRACKING_USERNAME": self.jobs_user,
            "MLFLOW_TRACKING_PASSWORD": self.secret("jobs"),
        }

    def s3_credentials(self) -> tuple[str, str]:
        """(access key id, secret key) of the stack's S3 server: the explicit ones, else with pass_aws_env the
        caller's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, else the stack's own (a generated secret)."""
        if self.access_key and self.secret_key:
            return self.access_key, self.secret_key
        if self.pass_aws_env:
            key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            if not (key and secret):
                raise StackError("--pass-aws-env: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must both be set")
            return key, secret
        return self.access_key or S3_ACCESS_KEY, self.secret_key or self.secret("s3")

    def secret(self, name: str) -> str:
        """A generated secret of this state dir (admin | jobs | flask | s3), created on first use, kept in
        secrets.json (mode 600) so that a restarted stack logs in with the same ones."""
        path = self.state_dir / "secrets.json"
        known = json.loads(path.read_text()) if path.exists() else {}
        if name not in known:
            known[name] = secrets.token_urlsafe(24)  # 32 characters; MLflow asks for at least 12
            _private_dir(self.state_dir)
            _write_private(path, json.dumps(known, indent=1) + "\n")
        return str(known[name])

    def up(self, services: Iterable[str] = SERVICES) -> dict[str, str]:
        """Start the services that are not running, wait until all answer, write `env`; return that env."""
        wanted = _resolve(services)
        self._validate()
        with self._locked():
            return self._up(wanted)

    def _up(self, wanted: list[str]) -> dict[str, str]:
        self._check_recorded()
        self._secure()
        _private_dir(self.state_dir / "logs")
        t0 = time.monotonic()
        started: dict[str, float] = {}
        try:
            to_start = []
            for name in wanted:
                pid = self._pid(name)
                if pid is None:
                    self._stop([name])  # leftovers of a crashed start (a dead leader's children) hold its ports
                    self._check_ports(name)
                    to_start.append(name)
                else:
                    self.echo(f"{name:<7}already running  pid {pid}  {self._url(name)}")
            if to_start:
                self._write_recorded()
            for name in to_start:
                if name == "ray":
                    said = _ensure_ray_token()
                    if said:
                        self.echo(said)
                self._spawn(name)
                started[name] = time.monotonic()
            self._wait_healthy(wanted, started)
        except BaseException:
            self._stop(started)
            raise
        self._write_env()
        self.echo(f"stack ready in {time.monotonic() - t0:.1f} s; client environment: . {self.state_dir / 'env'}")
        return self.env()

    def down(self, services: Iterable[str] = SERVICES) -> None:
        """Stop the given services (default: all) that this state dir started; a no-op for those not running."""
        names = [s for s in reversed(SERVICES) if s in set(services)]
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise StackError(f"unknown service(s) {sorted(unknown)}; choose from {', '.join(SERVICES)}")
        stopped: dict[str, bool] = {}
        if self.state_dir.is_dir():
            with self._locked():
                stopped = self._stop(names)
        for name in names:
            self.echo(f"{name:<7}{'stopped' if stopped.get(name) else 'not running'}")
        if set(names) == set(SERVICES):
            (self.state_dir / "env").unlink(missing_ok=True)

    def status(self) -> dict[str, bool]:
        """Service -> running (our process is alive) and healthy (it answers its health check)."""
        return {name: self._pid(name) is not None and self._probe(name)[0] for name in SERVICES}

    def pids(self) -> dict[str, int | None]:
        return {name: self._pid(name) for name in SERVICES}

    def describe(self) -> list[str]:
        """One status line per service."""
        lines = []
        for name, ok in self.status().items():
            pid = self._pid(name)
            state = "up" if ok else ("unhealthy" if pid else "down")
            where = f"  pid {pid}  {self._url(name)}" if pid else ""
            lines.append(f"{name:<7}{state:<10}{where}")
        return lines

    def env_text(self) -> str:
        head = f"# Client environment of the local stack in {self.state_dir}. Use: . {self.state_dir / 'env'}\n"
        return head + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items())

    # ---------------------------------------------------------------- services

    def _base_env(self) -> dict[str, str]:
        """The caller's environment, less its own cloud keys (AWS_*) unless pass_aws_env asks for them."""
        return {k: v for k, v in os.environ.items() if self.pass_aws_env or not k.startswith("AWS_")}

    def _command(self, name: str) -> tuple[list[str], dict[str, str]]:
        client = self.env()
        s3_env = {k: client[k] for k in client if k.startswith(("AWS_", "MLFLOW_S3"))}
        if name == "s3":
            data = self.state_dir / "s3"
            _private_dir(data)
            ports = self._weed_ports()
            # `weed mini`: master, volume server, filer and S3 gateway in one process, data in `data` (volumes and
            # the filer's LevelDB), every listener on 127.0.0.1, no telemetry; it takes its one S3 identity from
            # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and refuses any other key (and anonymous requests).
            argv = [_exe("weed"), "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.port={self.s3_port}",
                    *(f"-{flag}={port}" for flag, port in ports.items()), "-s3.port.iceberg=0", "-s3.port.lance=0",
                    "-webdav=false", "-admin.ui=false", "-master.telemetry=false"]
            return argv, {**self._base_env(), **s3_env}
        if name == "mlflow":
            argv = [_exe("mlflow"), "server", "--app-name", "basic-auth", "--host", HOST, "--port",
                    str(self.mlflow_port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{self.state_dir / 'mlflow.db'}",
                    "--artifacts-destination", f"s3://{self.bucket}/artifacts"]
            env = {k: v for k, v in self._base_env().items() if not k.startswith("MLFLOW_TRACKING_")}
            # Job execution (GenAI judges) would add 8 worker processes that nothing here uses.
            return argv, {**env, **s3_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                          "MLFLOW_AUTH_CONFIG_PATH": str(self._auth_config()),
                          "MLFLOW_AUTH_ADMIN_PASSWORD": self.secret("admin"),  # used once, to create the admin
                          "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret("flask")}  # signs the UI's CSRF tokens
        argv = [_exe("ray"), "start", "--head", "--block", "--num-cpus", str(self.num_cpus),
                "--node-ip-address", HOST, "--port", str(self.ray_gcs_port), "--dashboard-host", HOST,
                "--dashboard-port", str(self.ray_dashboard_port), "--ray-client-server-port", str(self.ray_client_port),
                "--dashboard-agent-listen-port", str(self.ray_agent_port), "--disable-usage-stats"]
        if self.ray_temp_dir:
            argv += ["--temp-dir", str(self.ray_temp_dir)]
        # Jobs inherit the head's environment: they find MLflow and S3 with no credentials in a runtime_env.
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (in `client`): the node address stays 127.0.0.1, so the GCS, raylet,
        # workers, agents, client server and metrics bind loopback.
        env = {**self._base_env(), **client, "RAY_AUTH_MODE": "token"}
        # `python` in a job's entrypoint must be this virtualenv's, whatever PATH the caller had.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env.pop("RAY_API_SERVER_ADDRESS", None)  # a client-side setting; the job supervisor sets its own
        # Every process of this head (jobs, Ray Train's controller and its placement-group cleaner) joins this
        # head: with `auto` and another Ray instance on the machine, Ray picks the latest one started.
        env["RAY_ADDRESS"] = f"{HOST}:{self.ray_gcs_port}"
        return argv, env

    def _probe(self, name: str) -> tuple[bool, str]:
        """(healthy, what was seen)."""
        if name == "s3":
            code, _ = _get(f"http://{HOST}:{self.s3_port}/healthz")  # anonymous S3 requests get 403
            if code != 200:
                return False, f"HTTP {code}"
            # The gateway answers before its volume server has reported to its master; until then every object
            # stored in a volume (all but the smallest) is an InternalError. Ready once the master locates each
            # volume on disk (seen after a SIGKILL: one start in six served `volume 1 not found` for ~0.1 s).
            missing = self._unlocated_volumes()
            return not missing, f"volumes {', '.join(map(str, missing))} not located yet" if missing else "HTTP 200"
        if name == "mlflow":
            code, body = _get(f"http://{HOST}:{self.mlflow_port}/health")
            return code == 200 and body.strip() == "OK", f"HTTP {code}"
        # The job API itself, with the token: what `ray job submit` needs.
        code, _ = _get(f"http://{HOST}:{self.ray_dashboard_port}/api/jobs/", token=_ray_token())
        return code == 200, f"HTTP {code}"

    def _unlocated_volumes(self) -> list[int]:
        """The S3 server's volumes on disk (`[collection_]N.dat`) that its master cannot locate yet."""
        try:
            master = int(json.loads((self.state_dir / "s3" / "ports.json").read_text())["master.port"])
        except (OSError, ValueError, KeyError, TypeError):
            return []  # no ports recorded: nothing was ever stored
        ids = sorted({int(m.group(1)) for f in (self.state_dir / "s3").glob("*.dat")
                      if (m := re.fullmatch(r"(?:.*_)?(\d+)\.dat", f.name))})
        return [v for v in ids if _get(f"http://{HOST}:{master}/dir/lookup?volumeId={v}")[0] != 200]

    def _url(self, name: str) -> str:
        if name == "s3":
            return f"http://{HOST}:{self.s3_port}  bucket {self.bucket}  data {self.state_dir / 's3'}"
        if name == "mlflow":
            return f"http://{HOST}:{self.mlflow_port}"
        return f"http://{HOST}:{self.ray_dashboard_port}  gcs {HOST}:{self.ray_gcs_port}  token auth"

    def _auth_config(self) -> Path:
        """The basic-auth app's settings: its user store beside mlflow.db; a logged-in user may read every
        experiment, and writes to the ones it created (what the jobs' user does). A checked password is
        remembered for AUTH_CACHE_SECONDS (MLflow's own cache, off by default): without it every request hashes
        the password again, half a second each on 2 cores, and a pipeline makes hundreds. One server worker, so a
        password changed through the API takes effect at once (MLflow drops that user's cached entries)."""
        path = self.state_dir / "mlflow_auth.ini"
        _write_private(path, "[mlflow]\ndefault_permission = READ\n"
                        f"database_uri = sqlite:///{self.state_dir / 'mlflow_auth.db'}\n"
                        "admin_username = admin\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n")
        return path

    def _ensure_jobs_user(self) -> None:
        """Create the jobs' user, or set its password to this state dir's (a stack restarted on kept state)."""
        try:
            ensure_mlflow_user(f"http://{HOST}:{self.mlflow_port}", ("admin", self.secret("admin")), self.jobs_user,
                               self.secret("jobs"))
        except StackError as e:
            raise StackError(f"{e}; the admin password in {self.state_dir / 'secrets.json'} must match the one its "
                             f"user store ({self.state_dir / 'mlflow_auth.db'}) was created with") from None

    def _create_bucket(self) -> None:
        import boto3
        from botocore.exceptions import ClientError

        env = self.env()
        s3 = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], region_name=REGION,
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        try:
            s3.create_bucket(Bucket=self.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    # ---------------------------------------------------------------- processes

    def _spawn(self, name: str) -> None:
        argv, env = self._command(name)
        fd = os.open(self._log(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            # Own session: `down` can signal the whole process group, and a Ctrl-C on `up` does not reach it.
            # umask: what the service writes later (databases, journals, S3 volumes, Ray's session files) is private.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.state_dir, start_new_session=True, umask=UMASK)
        self._procs[name] = proc
        _write_private(self._pidfile(name), json.dumps({"pid": proc.pid, "start": _start_time(proc.pid)}))

    def _pid(self, name: str) -> int | None:
        """The pid of our running process for `name`, or None (no pid file, dead, or the pid was reused)."""
        rec = self._read_pidfile(name)
        return rec[0] if rec and _alive(*rec) else None

    def _read_pidfile(self, name: str) -> tuple[int, str | None] | None:
        try:
            data = json.loads(self._pidfile(name).read_text())
            return int(data["pid"]), data.get("start")
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _wait_healthy(self, names: list[str], started: dict[str, float]) -> None:
        """Poll every service until it answers: they start together, so MLflow's ~15 s overlaps Ray's."""
        t0 = time.monotonic()
        pending = list(names)
        while pending:
            for name in list(pending):
                ok, seen = self._probe(name)
                log = self._log(name)
                if ok:
                    pending.remove(name)
                    if name == "s3":
                        self._create_bucket()
                    if name == "mlflow":
                        self._ensure_jobs_user()
                    if name in started:
                        took = time.monotonic() - started[name]
                        self.echo(f"{name:<7}started  pid {self._pid(name)}  {self._url(name)}  ({took:.1f} s)")
                elif self._pid(name) is None:
                    raise StackError(f"{name} exited during start-up. Last lines of {log}:\n{_tail(log)}")
                elif name == "ray" and seen in ("HTTP 401", "HTTP 403"):
                    raise StackError(f"the Ray head refuses our token ({seen}): {_TOKEN_HELP}")
                elif time.monotonic() - started.get(name, t0) > self.timeout:
                    raise StackError(f"{name} did not answer at {self._url(name)} within {self.timeout:.0f} s ({seen}). "
                                     f"Last lines of {log}:\n{_tail(log)}")
            if pending:
                time.sleep(0.3)

    def _stop(self, names: Iterable[str]) -> dict[str, bool]:
        """Stop these services' process groups, all at once; name -> whether it was running."""
        targets: dict[str, tuple[int, str | None, bool]] = {}
        for name in names:
            rec = self._read_pidfile(name)
            if rec is not None:
                targets[name] = (*rec, _alive(*rec))
                if targets[name][2]:
                    # The leader stops its children in order: `ray start --block` drains the node, `mlflow server`
                    # forwards the signal to uvicorn.
                    _signal(rec[0], signal.SIGTERM, group=False)
        deadline = time.monotonic() + STOP_WAIT_S
        while any(running and _alive(pid, start) for pid, start, running in targets.values()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for name in targets:
            if name in self._procs:
                self._procs[name].poll()  # reap our own exited child
        # A process group id cannot be reused while any member lives, so what is left in it is ours.
        groups = [pid for pid, _, running in targets.values() if running or _gone(pid)]
        for pgid in groups:
            _signal(pgid, signal.SIGTERM, group=True)
        deadline = time.monotonic() + 5
        while any(_group_exists(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pgid in groups:
            _signal(pgid, signal.SIGKILL, group=True)
        for name in targets:
            proc = self._procs.pop(name, None)
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._pidfile(name).unlink(missing_ok=True)
            if name == "s3":
                self._remove_weed_sockets()
        return {name: running for name, (_, _, running) in targets.items()}

    # ---------------------------------------------------------------- checks and files

    def _validate(self) -> None:
        ports = {f: getattr(self, f) for f in PORTS}
        if len(set(ports.values())) != len(ports):
            raise StackError(f"two services share a port: {ports}")
        for f, port in ports.items():
            if PORTS[f][0] == "ray" and port in RAY_WORKER_PORTS:
                raise StackError(f"port {port} ({f}) lies in Ray's worker port range "
                                 f"{RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}: choose another")

    def _check_recorded(self) -> None:
        rec = self.recorded()
        if rec is None:
            return
        differ = {k: (getattr(rec, k), getattr(self, k)) for k in RECORDED if getattr(rec, k) != getattr(self, k)}
        alive = [n for n in SERVICES if self._pid(n) is not None]
        if differ and alive:
            said = ", ".join(f"{k}: running {a}, asked {b}" for k, (a, b) in differ.items())
            raise StackError(f"{self.state_dir} already runs {', '.join(alive)} with other settings ({said}). "
                             "Run `down` first, or use another --state-dir.")

    def _check_ports(self, name: str) -> None:
        for f, (service, var) in PORTS.items():
            port = getattr(self, f)
            if service == name and not _port_free(port):
                raise StackError(f"port {port} ({name}: {f}) is already in use by another process. Stop it, or "
                                 f"choose another port with --{f.replace('_', '-')} or {var}.")

    def _secure(self) -> None:
        """The state dir 0700 and its secret files 0600, also those an older stack left readable."""
        _private_dir(self.state_dir)
        for name in ("secrets.json", "env", "mlflow.db", "mlflow_auth.db", "mlflow_auth.ini", "stack.json"):
            for path in self.state_dir.glob(f"{name}*"):  # with SQLite's -journal / -wal / -shm files
                if path.is_file():
                    path.chmod(0o600)
        for sub in ("s3", "logs"):
            if (self.state_dir / sub).is_dir():
                (self.state_dir / sub).chmod(0o700)

    def _weed_ports(self) -> dict[str, int]:
        """The S3 server's internal ports: those of its last start (kept in s3/ports.json) while they are free,
        else new ones the kernel picks (outside Ray's worker range), the admin's gRPC port (+10000) free too."""
        path = self.state_dir / "s3" / "ports.json"
        try:
            ports = {k: int(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            ports = {}
        wanted = set(WEED_PORTS)
        if set(ports) != wanted or not all(_port_free(p) for p in _with_grpc(ports)):
            ports = _pick_weed_ports(exclude={getattr(self, f) for f in PORTS})
            _write_private(path, json.dumps(ports, indent=1) + "\n")
        return ports

    def _remove_weed_sockets(self) -> None:
        """The Unix sockets a stopped S3 server leaves in /tmp (`/tmp/seaweedfs-<server>-<port>.sock`)."""
        try:
            ports = json.loads((self.state_dir / "s3" / "ports.json").read_text())
        except (OSError, ValueError):
            return
        ports = {int(p) for p in ports.values()} | {self.s3_port, int(ports.get("admin.port", 0)) + WEED_GRPC_OFFSET}
        for path in Path("/tmp").glob("seaweedfs-*.sock"):
            port = path.stem.rsplit("-", 1)[-1]
            if port.isdigit() and int(port) in ports and path.is_socket() and path.stat().st_uid == os.getuid():
                path.unlink(missing_ok=True)

    def _write_recorded(self) -> None:
        data = {k: getattr(self, k) for k in RECORDED}
        data["ray_temp_dir"] = str(self.ray_temp_dir) if self.ray_temp_dir else None
        _write_private(self.state_dir / "stack.json", json.dumps(data, indent=1) + "\n")

    def _write_env(self) -> None:
        # It holds the jobs' MLflow password and the stack's S3 credentials.
        _write_private(self.state_dir / "env", self.env_text())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up` or `down` at a time per state dir (two would each start a copy, or lose a pid file)."""
        _private_dir(self.state_dir)
        with os.fdopen(os.open(self.state_dir / ".lock", os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _pidfile(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def _log(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"


# -------------------------------------------------------------------- helpers

_TOKEN_HELP = ("token authentication is on; a client needs RAY_AUTH_MODE=token and the head's token, from "
               "RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token")


def _resolve(services: Iterable[str]) -> list[str]:
    asked = set(services)
    unknown = asked - set(SERVICES)
    if unknown:
        raise StackError(f"unknown service(s) {sorted(unknown)}; choose from {', '.join(SERVICES)}")
    if "mlflow" in asked:
        asked.add("s3")  # MLflow stores its artifacts there
    return [s for s in SERVICES if s in asked]


def _exe(name: str) -> str:
    here = Path(sys.executable).parent / name  # the virtualenv this module runs in
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found: install the dev extras (pip install -e '.[dev]')")
    return found


def _ray_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]) if os.environ.get("RAY_AUTH_TOKEN_PATH") else RAY_DEFAULT_TOKEN
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def ray_token_path() -> Path | None:
    """The file Ray's clients read the token from (None when RAY_AUTH_TOKEN holds the token itself)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    return Path(os.environ["RAY_AUTH_TOKEN_PATH"]) if os.environ.get("RAY_AUTH_TOKEN_PATH") else RAY_DEFAULT_TOKEN


def _ensure_ray_token() -> str | None:
    """`ray start` with RAY_AUTH_MODE=token refuses to start without a token: make one where Ray's clients look,
    readable by its owner only (`ray get-auth-token --generate` writes it world-readable), and make an existing token
    file so too. Returns a line to show when it changed an existing file's mode."""
    path = ray_token_path()
    if path is None:
        return None
    if _ray_token() is None:
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        _write_private(path, secrets.token_hex(32))
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        path.chmod(0o600)
        return f"ray    token file {path} was mode {mode:o}: now 600 (whoever reads it may run jobs on this head)"
    return None


def _private_dir(path: Path) -> None:
    """A folder only its owner may enter (0700), created if missing."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` as a file only its owner may read (0600), replacing it whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when a stale temporary file was there with another mode
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
    finally:
        if fd != -1:
            os.close(fd)
    tmp.replace(path)


def _with_grpc(ports: dict[str, int]) -> list[int]:
    """Every port the S3 server opens: the given ones and the admin server's gRPC port."""
    return [*ports.values(), ports["admin.port"] + WEED_GRPC_OFFSET]


def _pick_weed_ports(exclude: set[int]) -> dict[str, int]:
    """Free loopback ports for the S3 server's internal servers, chosen by the kernel (its ephemeral range lies
    above Ray's worker ports); the admin port such that port + 10000 is free too."""
    socks: list[socket.socket] = []
    taken = set(exclude)

    def grab() -> int:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((HOST, 0))
        socks.append(s)  # held until all are chosen, so no two are the same
        port = s.getsockname()[1]
        taken.add(port)
        return port

    try:
        ports = {}
        for flag in WEED_PORTS:
            port = grab()
            while port in RAY_WORKER_PORTS or port in exclude or (
                    flag == "admin.port" and (port + WEED_GRPC_OFFSET > 65535 or port + WEED_GRPC_OFFSET in taken
                                              or not _port_free(port + WEED_GRPC_OFFSET))):
                port = grab()
            ports[flag] = port
        return ports
    finally:
        for s in socks:
            s.close()


def _get(url: str, token: str | None = None, timeout: float = 3.0) -> tuple[int, str]:
    """(HTTP status or 0 when nothing answers, start of the body)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with _HTTP.open(req, timeout=timeout) as r:
            return r.status, r.read(65536).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (OSError, ValueError):
        return 0, ""


def ensure_mlflow_user(url: str, admin: tuple[str, str], user: str, password: str) -> None:
    """Create `user` on the MLflow server at `url` (basic-auth app) as `admin`, or reset its password when it
    exists. Raises StackError naming the server's answer otherwise."""
    base = f"{url.rstrip('/')}/api/2.0/mlflow/users"
    body = {"username": user, "password": password}
    code, text = _send(f"{base}/create", "POST", body, admin)
    if code == 400 and "RESOURCE_ALREADY_EXISTS" in text:
        code, text = _send(f"{base}/update-password", "PATCH", body, admin)
    if code != 200:
        raise StackError(f"MLflow at {url} did not accept the user {user!r} (HTTP {code}: {text[:200]})")


def _send(url: str, method: str, body: dict, login: tuple[str, str]) -> tuple[int, str]:
    """A JSON request with basic auth: (HTTP status or 0 when nothing answers, start of the body)."""
    auth = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"})
    try:
        with _HTTP.open(req, timeout=30) as r:
            return r.status, r.read(65536).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(65536).decode(errors="replace")
    except (OSError, ValueError) as e:
        return 0, str(e)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT socket is not a running service
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


# Process checks read /proc where there is one (Linux): a zombie counts as dead there, and init may be slow
# to reap the orphans of a killed leader. Elsewhere, signal 0 is the fallback.
_PROC = Path("/proc/self/stat").exists()


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields from the state on (state, ppid, pgrp, ...), None if gone or a zombie."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields_[0] in ("Z", "X") else fields_


def _start_time(pid: int) -> str | None:
    stat = _stat(pid)
    return stat[19] if stat else None


def _alive(pid: int, start: str | None) -> bool:
    """Alive and the same process that was recorded (pids get reused)."""
    if _PROC:
        now = _start_time(pid)
        return now is not None and (start is None or now == start)
    return not _gone(pid)


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (which keeps the pid, so nobody else can have it)."""
    if _PROC:
        return _stat(pid) is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _group_exists(pgid: int) -> bool:
    """Some live process is in this process group."""
    if _PROC:
        return any((stat := _stat(int(d.name))) and stat[2] == str(pgid)
                   for d in Path("/proc").iterdir() if d.name.isdigit())
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal(pid: int, sig: signal.Signals, group: bool) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -------------------------------------------------------------------- CLI


def _mlflow_user(url: str, wait: float) -> int:
    need = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    missing = [k for k in need if not os.environ.get(k)]
    if missing:
        print(f"error: {', '.join(missing)} not set: the node's environment must hold the MLflow credentials",
              file=sys.stderr)
        return 1
    deadline = time.monotonic() + wait
    while _get(f"{url.rstrip('/')}/health")[0] != 200:
        if time.monotonic() > deadline:
            print(f"error: MLflow at {url} did not answer /health within {wait:.0f} s", file=sys.stderr)
            return 1
        time.sleep(1)
    try:
        ensure_mlflow_user(url, (os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"),
                                 os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]),
                           os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"])
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MLflow user {os.environ['MLFLOW_TRACKING_USERNAME']!r} ready at {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, help="state directory (env OAL_STACK_DIR; default <repo>/.stack)")
    defaults = Stack.__dataclass_fields__
    for f, (service, var) in PORTS.items():
        common.add_argument(f"--{f.replace('_', '-')}", dest=f, type=int,
                            help=f"{service} port (env {var}; default {defaults[f].default})")
    common.add_argument("--num-cpus", type=int, help="CPUs the Ray head offers (env OAL_RAY_NUM_CPUS; default all)")
    common.add_argument("--bucket", help="S3 bucket (env OAL_S3_BUCKET; default oal)")
    common.add_argument("--ray-temp-dir", type=Path, help="Ray's --temp-dir (env OAL_RAY_TEMP_DIR; default /tmp/ray)")
    common.add_argument("--pass-aws-env", action="store_true", default=None,
                        help="make the caller's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY the stack's S3 credentials "
                        "(written into `env` and every job's environment; default: the stack's own generated ones)")
    parser = argparse.ArgumentParser(prog="python -m cluster.stack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="start the services that are not running")
    up.add_argument("--services", default=",".join(SERVICES), help="comma-separated subset of s3,mlflow,ray")
    up.add_argument("--timeout", type=float, help="seconds to wait for each service (default 120)")
    down = sub.add_parser("down", parents=[common], help="stop what `up` started")
    down.add_argument("--services", default=",".join(SERVICES), help="comma-separated subset of s3,mlflow,ray")
    sub.add_parser("status", parents=[common], help="one line per service; exit 1 if one is not up")
    sub.add_parser("env", parents=[common], help="print the client environment (export lines)")
    secret = sub.add_parser("secret", parents=[common], help="print a generated password: admin (MLflow's admin "
                            "user, for its user management) or jobs (the jobs' user)")
    secret.add_argument("which", choices=("admin", "jobs"))
    user = sub.add_parser("mlflow-user", help="on a cluster's head: create the jobs' MLflow user (or reset its "
                          "password) from the environment: MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_TRACKING_USERNAME, "
                          "MLFLOW_TRACKING_PASSWORD")
    user.add_argument("--url", default="http://127.0.0.1:5050", help="the MLflow server (default %(default)s)")
    user.add_argument("--wait", type=float, default=120.0, help="seconds to wait for it to answer /health")
    args = parser.parse_args(argv)

    if args.command == "mlflow-user":
        return _mlflow_user(args.url, args.wait)
    settings = {k: getattr(args, k) for k in (*PORTS, "num_cpus", "bucket", "ray_temp_dir", "pass_aws_env")}
    try:
        stack = Stack.from_env(state_dir=args.state_dir, **settings)
        if args.command == "up" and args.timeout:
            stack.timeout = args.timeout
        rec = stack.recorded()
        # The state dir names the stack: its recorded settings win unless `up` is told otherwise.
        if rec is not None and (args.command != "up" or (not any(v is not None for v in settings.values())
                                                         and any(rec.pids().values()))):
            stack = rec
        if args.command == "up":
            stack.up([s.strip() for s in args.services.split(",") if s.strip()])
        elif args.command == "down":
            stack.down([s.strip() for s in args.services.split(",") if s.strip()])
        elif args.command == "secret":
            print(stack.secret(args.which))
        elif args.command == "status":
            print("\n".join(stack.describe()))
            return 0 if all(stack.status().values()) else 1
        else:
            path = stack.state_dir / "env"
            if path.exists():
                print(path.read_text(), end="")
            else:
                print(f"# the stack in {stack.state_dir} is not up", file=sys.stderr)
                print(stack.env_text(), end="")
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (what this `up` had started is stopped again)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
