"""The stack's MLflow server: its basic-auth app (anonymous requests get 401, only /health answers), runs in SQLite
in the state dir, artifacts in the stack's S3 bucket; the jobs' user created once it answers."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster.procs import HOST, HTTP, StackError, exe, http_get, write_private
from cluster.services import s3
from cluster.services.base import Service, Stack

AUTH_CACHE_SECONDS = 300  # MLflow basic-auth: how long a checked password is remembered (see auth_config)


class MLflow(Service):
    name = "mlflow"
    ports = {"mlflow_port": "OAL_MLFLOW_PORT"}
    needs = ("s3",)  # it stores its artifacts there
    files = ("mlflow.db", "mlflow_auth.db", "mlflow_auth.ini")

    def command(self, st: Stack) -> tuple[list[str], dict[str, str]]:
        s3_env = s3.client_env(st)
        argv = [exe("mlflow"), "server", "--app-name", "basic-auth", "--host", HOST, "--port",
                str(st.mlflow_port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{st.state_dir / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{st.bucket}/artifacts"]
        env = {k: v for k, v in st.base_env().items() if not k.startswith("MLFLOW_TRACKING_")}
        # Job execution (GenAI judges) would add 8 worker processes that nothing here uses.
        return argv, {**env, **s3_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                      "MLFLOW_AUTH_CONFIG_PATH": str(auth_config(st.state_dir)),
                      "MLFLOW_AUTH_ADMIN_PASSWORD": st.secret("admin"),  # used once, to create the admin
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": st.secret("flask")}  # signs the UI's CSRF tokens

    def probe(self, st: Stack) -> tuple[bool, str]:
        code, body = http_get(f"http://{HOST}:{st.mlflow_port}/health")
        return code == 200 and body.strip() == "OK", f"HTTP {code}"

    def url(self, st: Stack) -> str:
        return f"http://{HOST}:{st.mlflow_port}"

    def ready(self, st: Stack) -> None:
        """Create the jobs' user, or set its password to this state dir's (a stack restarted on kept state)."""
        try:
            ensure_mlflow_user(f"http://{HOST}:{st.mlflow_port}", ("admin", st.secret("admin")), st.jobs_user,
                               st.secret("jobs"))
        except StackError as e:
            raise StackError(f"{e}; the admin password in {st.state_dir / 'secrets.json'} must match the one its "
                             f"user store ({st.state_dir / 'mlflow_auth.db'}) was created with") from None


def auth_config(state_dir: Path) -> Path:
    """The basic-auth app's settings: its user store beside mlflow.db; a logged-in user may read every
    experiment, and writes to the ones it created (what the jobs' user does). A checked password is
    remembered for AUTH_CACHE_SECONDS (MLflow's own cache, off by default): without it every request hashes
    the password again, half a second each on 2 cores, and a pipeline makes hundreds. One server worker, so a
    password changed through the API takes effect at once (MLflow drops that user's cached entries)."""
    path = state_dir / "mlflow_auth.ini"
    write_private(path, "[mlflow]\ndefault_permission = READ\n"
                  f"database_uri = sqlite:///{state_dir / 'mlflow_auth.db'}\n"
                  "admin_username = admin\n"
                  "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                  f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n")
    return path


def ensure_mlflow_user(url: str, admin: tuple[str, str], user: str, password: str) -> None:
    """Create `user` on the MLflow server at `url` (basic-auth app) as `admin`, or reset its password when it
    exists. Raises StackError naming the server's answer otherwise."""
    base = f"{url.rstrip('/')}/api/2.0/mlflow/users"
    body = {"username": user, "password": password}
    code, text = send(f"{base}/create", "POST", body, admin)
    if code == 400 and "RESOURCE_ALREADY_EXISTS" in text:
        code, text = send(f"{base}/update-password", "PATCH", body, admin)
    if code != 200:
        raise StackError(f"MLflow at {url} did not accept the user {user!r} (HTTP {code}: {text[:200]})")


def send(url: str, method: str, body: dict, login: tuple[str, str]) -> tuple[int, str]:
    """A JSON request with basic auth: (HTTP status or 0 when nothing answers, start of the body)."""
    auth = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"})
    try:
        with HTTP.open(req, timeout=30) as r:
            return r.status, r.read(65536).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(65536).decode(errors="replace")
    except (OSError, ValueError) as e:
        return 0, str(e)


def user_command(url: str, wait: float) -> int:
    """`python -m cluster.stack mlflow-user`: on a cluster's head, the jobs' user from the environment."""
    need = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    missing = [k for k in need if not os.environ.get(k)]
    if missing:
        print(f"error: {', '.join(missing)} not set: the node's environment must hold the MLflow credentials",
              file=sys.stderr)
        return 1
    deadline = time.monotonic() + wait
    while http_get(f"{url.rstrip('/')}/health")[0] != 200:
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
