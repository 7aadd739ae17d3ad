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

Here: the supervisor (`Stack`: up, down, status, env, secrets, the lock, the recorded settings) and the CLI. Each
service is a module of cluster/services/ (its command line, environment, probe, set-up, ports); processes, pid files
and port probes are cluster/procs.py.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

if not __package__:  # run as a file (`python cluster/stack.py mlflow-user`: cluster/aws.yaml): the package is beside it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster import procs
from cluster.procs import HOST, StackError, private_dir, write_private
from cluster.services import REGISTRY, Service
from cluster.services.mlflow import ensure_mlflow_user, user_command
from cluster.services.mlflow import send as _send
from cluster.services.ray import RAY_WORKER_PORTS, ray_token_path
from cluster.services.ray import ensure_ray_token as _ensure_ray_token
from cluster.services.ray import ray_token as _ray_token
from cluster.services.s3 import REGION, S3_ACCESS_KEY

# Names other code imports from here (the services' helpers among them, for the tests).
__all__ = ["HOST", "PORTS", "RAY_WORKER_PORTS", "RECORDED", "REGION", "SERVICES", "Stack", "StackError",
           "_ensure_ray_token", "_ray_token", "_send", "ensure_mlflow_user", "main", "ray_token_path"]

REPO = Path(__file__).resolve().parent.parent
SERVICES = tuple(REGISTRY)  # s3, mlflow, ray: the order `up` starts them in
# Port fields: the service that owns each and its environment variable.
PORTS = {f: (s.name, var) for s in REGISTRY.values() for f, var in s.ports.items()}
# What `up` records in stack.json: enough for `status`, `env` and `down` to find the running stack.
RECORDED = (*PORTS, "num_cpus", "bucket", "ray_temp_dir", "pass_aws_env")


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
            private_dir(self.state_dir)
            write_private(path, json.dumps(known, indent=1) + "\n")
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
        private_dir(self.state_dir / "logs")
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
                said = REGISTRY[name].prepare(self)
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
        return lines + [f"warning: {w}" for service in REGISTRY.values() if (w := service.warning(self))]

    def env_text(self) -> str:
        head = f"# Client environment of the local stack in {self.state_dir}. Use: . {self.state_dir / 'env'}\n"
        return head + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items())

    # ---------------------------------------------------------------- services (cluster/services/)

    def ports(self) -> dict[str, int]:
        """Port field -> its port, every service's."""
        return {f: getattr(self, f) for f in PORTS}

    def base_env(self) -> dict[str, str]:
        """The caller's environment, less its own cloud keys (AWS_*) unless pass_aws_env asks for them."""
        return {k: v for k, v in os.environ.items() if self.pass_aws_env or not k.startswith("AWS_")}

    def _command(self, name: str) -> tuple[list[str], dict[str, str]]:
        return REGISTRY[name].command(self)

    def _probe(self, name: str) -> tuple[bool, str]:
        """(healthy, what was seen)."""
        return REGISTRY[name].probe(self)

    def _url(self, name: str) -> str:
        return REGISTRY[name].url(self)

    # ---------------------------------------------------------------- processes

    def _spawn(self, name: str) -> None:
        argv, env = self._command(name)
        proc = procs.spawn(argv, env, self._log(name), cwd=self.state_dir)
        self._procs[name] = proc
        procs.write_pidfile(self._pidfile(name), proc.pid)

    def _pid(self, name: str) -> int | None:
        """The pid of our running process for `name`, or None (no pid file, dead, or the pid was reused)."""
        rec = procs.read_pidfile(self._pidfile(name))
        return rec[0] if rec and procs.alive(*rec) else None

    def _wait_healthy(self, names: list[str], started: dict[str, float]) -> None:
        """Poll every service until it answers: they start together, so MLflow's ~15 s overlaps Ray's."""
        t0 = time.monotonic()
        pending = list(names)
        while pending:
            for name in list(pending):
                service = REGISTRY[name]
                ok, seen = service.probe(self)
                log = self._log(name)
                if ok:
                    pending.remove(name)
                    service.ready(self)
                    if name in started:
                        took = time.monotonic() - started[name]
                        self.echo(f"{name:<7}started  pid {self._pid(name)}  {self._url(name)}  ({took:.1f} s)")
                elif self._pid(name) is None:
                    raise StackError(f"{name} exited during start-up. Last lines of {log}:\n{procs.tail(log)}")
                elif refused := service.refusal(seen):
                    raise StackError(refused)
                elif time.monotonic() - started.get(name, t0) > self.timeout:
                    raise StackError(f"{name} did not answer at {self._url(name)} within {self.timeout:.0f} s ({seen}). "
                                     f"Last lines of {log}:\n{procs.tail(log)}")
            if pending:
                time.sleep(0.3)

    def _stop(self, names: Iterable[str]) -> dict[str, bool]:
        """Stop these services' process groups, all at once; name -> whether it was running."""
        leaders = {name: rec for name in names if (rec := procs.read_pidfile(self._pidfile(name))) is not None}
        running = procs.stop_groups(leaders, self._procs)
        for name in leaders:
            proc = self._procs.pop(name, None)
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._pidfile(name).unlink(missing_ok=True)
            REGISTRY[name].stopped(self)
        return running

    # ---------------------------------------------------------------- checks and files

    def _validate(self) -> None:
        ports = self.ports()
        if len(set(ports.values())) != len(ports):
            raise StackError(f"two services share a port: {ports}")
        for service in REGISTRY.values():
            service.check(self)

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
            if service == name and not procs.port_free(port):
                raise StackError(f"port {port} ({name}: {f}) is already in use by another process. Stop it, or "
                                 f"choose another port with --{f.replace('_', '-')} or {var}.")

    def _secure(self) -> None:
        """The state dir 0700 and its secret files 0600, also those an older stack left readable."""
        private_dir(self.state_dir)
        services: list[Service] = list(REGISTRY.values())
        for name in ("secrets.json", "env", *(f for s in services for f in s.files), "stack.json"):
            for path in self.state_dir.glob(f"{name}*"):  # with SQLite's -journal / -wal / -shm files
                if path.is_file():
                    path.chmod(0o600)
        for sub in (*(d for s in services for d in s.dirs), "logs"):
            if (self.state_dir / sub).is_dir():
                (self.state_dir / sub).chmod(0o700)

    def _write_recorded(self) -> None:
        data = {k: getattr(self, k) for k in RECORDED}
        data["ray_temp_dir"] = str(self.ray_temp_dir) if self.ray_temp_dir else None
        write_private(self.state_dir / "stack.json", json.dumps(data, indent=1) + "\n")

    def _write_env(self) -> None:
        # It holds the jobs' MLflow password and the stack's S3 credentials.
        write_private(self.state_dir / "env", self.env_text())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up` or `down` at a time per state dir (two would each start a copy, or lose a pid file)."""
        private_dir(self.state_dir)
        with os.fdopen(os.open(self.state_dir / ".lock", os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _pidfile(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def _log(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"


def _resolve(services: Iterable[str]) -> list[str]:
    asked = set(services)
    unknown = asked - set(SERVICES)
    if unknown:
        raise StackError(f"unknown service(s) {sorted(unknown)}; choose from {', '.join(SERVICES)}")
    asked |= {need for s in asked for need in REGISTRY[s].needs}
    return [s for s in SERVICES if s in asked]

# -------------------------------------------------------------------- CLI


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
        return user_command(args.url, args.wait)
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
