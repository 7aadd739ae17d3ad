"""The stack's Ray head: `ray start --head --block` on 127.0.0.1 with token authentication, the stack's client
environment handed on to every job."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from cluster.procs import HOST, StackError, exe, http_get, write_private
from cluster.services.base import Service, Stack

# Ray hands its worker processes ports from this range (its default), so its fixed ports must lie outside.
RAY_WORKER_PORTS = range(10002, 20000)
RAY_DEFAULT_TOKEN = Path.home() / ".ray" / "auth_token"
TOKEN_HELP = ("token authentication is on; a client needs RAY_AUTH_MODE=token and the head's token, from "
              "RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token")


class Ray(Service):
    name = "ray"
    ports = {"ray_dashboard_port": "OAL_RAY_DASHBOARD_PORT", "ray_gcs_port": "OAL_RAY_GCS_PORT",
             "ray_client_port": "OAL_RAY_CLIENT_PORT", "ray_agent_port": "OAL_RAY_AGENT_PORT"}

    def command(self, st: Stack) -> tuple[list[str], dict[str, str]]:
        client = st.env()
        argv = [exe("ray"), "start", "--head", "--block", "--num-cpus", str(st.num_cpus),
                "--node-ip-address", HOST, "--port", str(st.ray_gcs_port), "--dashboard-host", HOST,
                "--dashboard-port", str(st.ray_dashboard_port), "--ray-client-server-port", str(st.ray_client_port),
                "--dashboard-agent-listen-port", str(st.ray_agent_port), "--disable-usage-stats"]
        if st.ray_temp_dir:
            argv += ["--temp-dir", str(st.ray_temp_dir)]
        # Jobs inherit the head's environment: they find MLflow and S3 with no credentials in a runtime_env.
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (in `client`): the node address stays 127.0.0.1, so the GCS, raylet,
        # workers, agents, client server and metrics bind loopback.
        env = {**st.base_env(), **client, "RAY_AUTH_MODE": "token"}
        # `python` in a job's entrypoint must be this virtualenv's, whatever PATH the caller had.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env.pop("RAY_API_SERVER_ADDRESS", None)  # a client-side setting; the job supervisor sets its own
        # Every process of this head (jobs, Ray Train's controller and its placement-group cleaner) joins this
        # head: with `auto` and another Ray instance on the machine, Ray picks the latest one started.
        env["RAY_ADDRESS"] = f"{HOST}:{st.ray_gcs_port}"
        return argv, env

    def probe(self, st: Stack) -> tuple[bool, str]:
        # The job API itself, with the token: what `ray job submit` needs.
        code, _ = http_get(f"http://{HOST}:{st.ray_dashboard_port}/api/jobs/", token=ray_token())
        return code == 200, f"HTTP {code}"

    def url(self, st: Stack) -> str:
        return f"http://{HOST}:{st.ray_dashboard_port}  gcs {HOST}:{st.ray_gcs_port}  token auth"

    def check(self, st: Stack) -> None:
        for f in self.ports:
            port = getattr(st, f)
            if port in RAY_WORKER_PORTS:
                raise StackError(f"port {port} ({f}) lies in Ray's worker port range "
                                 f"{RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}: choose another")

    def prepare(self, st: Stack) -> str | None:
        return ensure_ray_token()

    def refusal(self, seen: str) -> str | None:
        if seen in ("HTTP 401", "HTTP 403"):
            return f"the Ray head refuses our token ({seen}): {TOKEN_HELP}"
        return None


def ray_token() -> str | None:
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


def ensure_ray_token() -> str | None:
    """`ray start` with RAY_AUTH_MODE=token refuses to start without a token: make one where Ray's clients look,
    readable by its owner only (`ray get-auth-token --generate` writes it world-readable), and make an existing token
    file so too. Returns a line to show when it changed an existing file's mode."""
    path = ray_token_path()
    if path is None:
        return None
    if ray_token() is None:
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        write_private(path, secrets.token_hex(32))
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        path.chmod(0o600)
        return f"ray    token file {path} was mode {mode:o}: now 600 (whoever reads it may run jobs on this head)"
    return None
