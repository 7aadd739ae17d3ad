"""Pytest plugin: the real local stack (cluster/stack.py), once per test session, started lazily.

Enable it with `pytest_plugins = ["tests.stack_fixtures"]` in conftest.py. Fixtures, all session-scoped
and sharing one Stack (so one Ray head per session at most):

    stack       S3 + MLflow + Ray head
    s3_mlflow   S3 + MLflow only
    ray_head    the Ray head only

Each yields a RunningStack (`.env`, `.stack`) and puts `.env` into os.environ for the rest of the session
(MLflow, boto3 and Ray job clients then find the servers). Only a session that asks for one of them
starts anything. Ports are free ones picked at run time, so a developer's own stack on the default ports
is never touched, and everything is stopped at the end of the session, failed or not.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.stack import RAY_WORKER_PORTS, SERVICES, Stack


@dataclass
class RunningStack:
    stack: Stack
    env: dict[str, str]

    @property
    def state_dir(self) -> Path:
        """Pid files, logs/<service>.log, mlflow.db, env."""
        return self.stack.state_dir


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback right now (kernel-chosen, so outside Ray's worker range)."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] in RAY_WORKER_PORTS:
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _refresh_ray_auth_mode() -> None:
    # Ray reads RAY_AUTH_MODE into its config once, when its core module first loads (test modules often
    # import ray at collection time, before this env is set). Re-read it, unless a driver is connected.
    raylet = sys.modules.get("ray._raylet")
    if raylet is not None and not sys.modules["ray"].is_initialized():
        raylet.Config.initialize("")
    # Likewise RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the stack's env): read once into ray_constants when ray is
    # imported; without it a driver looks for the head (on 127.0.0.1) on the machine's network address.
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        constants.ENABLE_RAY_CLUSTER = False


# Set before the head starts, so that the head's processes (and the jobs' drivers) inherit them as this process's
# drivers do; a caller's value wins.
SESSION_ENV = {
    # Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a run notices
    # its started workers, its reports and its end only at the next poll. A 0.5 s poll takes about 3 s off each of
    # the session's ~30 Ray Train runs (a 1-epoch digits teacher: 19 s -> 16 s here).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # On SIGTERM (`stack.down()` at the end of the session) `ray start --block` first drains its node, for Serve
    # replicas to move away, and waits up to 30 s for the raylet to go idle, which it does not here: 0 stops the head
    # at once (the session's teardown: 32 s -> 2 s).
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    # Ray Train starts a PreemptionWatcher actor (a process of its own) beside every worker group it starts, to watch
    # for cloud nodes being drained; the session's head is never drained. Without it, each of the session's ~35 worker
    # group starts has one process fewer to start on the CPUs its worker is starting on.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The GCS declares a node dead after RAY_health_check_failure_threshold (5) failed health checks in a row, one
    # every RAY_health_check_period_ms (3 s by default): a lost node is noticed ~15 s after its raylet went. Once a
    # second here (the head reads it when it starts): ~5 s, for the two-node tests' lost nodes. A check still
    # waits RAY_health_check_timeout_ms (10 s) for a busy raylet's answer: only a raylet that refuses five in a row
    # (gone) is declared dead.
    "RAY_health_check_period_ms": "1000",
}


STACK_FIXTURES = frozenset({"stack", "s3_mlflow", "ray_head", "_stack_session"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Under pytest-xdist (`make test`: two processes, --dist loadgroup) every test that uses the stack runs in one
    # process, so the session still starts one Ray head, one MLflow and one S3 server, and the tests that need none of
    # them run in the other process meanwhile. The stack's tests go first (in their own order), so that their process
    # starts on them at once: they are most of the suite's time.
    uses = {id(item): bool(STACK_FIXTURES.intersection(getattr(item, "fixturenames", ()))) for item in items}
    for item in items:
        if uses[id(item)]:
            item.add_marker(pytest.mark.xdist_group("stack"))
    items.sort(key=lambda item: not uses[id(item)])


# Under pytest-xdist, the process that runs no test of the stack runs at this niceness (from its first test on): its
# tests take less time than the stack's, which are most of the suite's, so the stack's process and its Ray head get
# the cores first while both run (at equal niceness the stack's tests ran 10-20% slower then).
OTHER_PROCESS_NICENESS = 10
_process_role: dict[str, bool] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER") or _process_role:
        return
    # The first test says which process this is: the stack's tests come first in the one that runs them.
    _process_role["stack"] = bool(STACK_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if not _process_role["stack"]:
        os.nice(OTHER_PROCESS_NICENESS)


@pytest.fixture(scope="session")
def _stack_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        # One stack per test session, not per xdist process: the first process to ask claims it in the folder the
        # processes share; a second one means the grouping above did not hold.
        claim = tmp_path_factory.getbasetemp().parent / "stack-claimed-by"
        try:
            with claim.open("x") as f:
                f.write(worker)
        except FileExistsError:
            owner = claim.read_text() or "another process"
            pytest.fail(f"pytest-xdist process {worker} was asked for the local stack, which {owner} "
                        "started: the stack's tests were not all given to one process (--dist loadgroup, "
                        "tests/stack_fixtures.py); see pyproject.toml's note on pytest's version")
    # Ray's socket paths (<temp-dir>/session_<date>_<pid>/sockets/...) must stay under 108 bytes: a short dir.
    ray_tmp = Path(tempfile.mkdtemp(prefix="oalray-"))
    s3, mlflow, dashboard, gcs, client, agent = free_ports(6)
    stack = Stack(state_dir=tmp_path_factory.mktemp("stack"), s3_port=s3, mlflow_port=mlflow,
                  ray_dashboard_port=dashboard, ray_gcs_port=gcs, ray_client_port=client, ray_agent_port=agent,
                  ray_temp_dir=ray_tmp)  # S3 credentials: the stack's own, generated
    saved = {k: os.environ.get(k) for k in [*stack.env(), *SESSION_ENV]}
    for k, v in SESSION_ENV.items():
        os.environ.setdefault(k, v)
    try:
        yield stack
    finally:
        # A driver still connected when its head stops is ended by Ray at once (no pytest summary, exit 1).
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        try:
            stack.down()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _start(stack: Stack, services: tuple[str, ...]) -> RunningStack:
    env = stack.up(services)
    os.environ.update(env)
    _refresh_ray_auth_mode()
    return RunningStack(stack, env)


@pytest.fixture(scope="session")
def stack(_stack_session: Stack) -> RunningStack:
    return _start(_stack_session, SERVICES)


@pytest.fixture(scope="session")
def s3_mlflow(_stack_session: Stack) -> RunningStack:
    return _start(_stack_session, ("s3", "mlflow"))


@pytest.fixture(scope="session")
def ray_head(_stack_session: Stack) -> RunningStack:
    return _start(_stack_session, ("ray",))


def wait_job(client, job_id: str, timeout: float = 180.0, poll: float = 0.25):
    """Poll a Ray job (`client`: a JobSubmissionClient) every `poll` seconds until it has ended (SUCCEEDED, FAILED or
    STOPPED) and return that status (a JobStatus, equal to its name as a string). After `timeout` seconds: an
    AssertionError with the job's status and the end of its log."""
    import time

    from ray.job_submission import JobStatus

    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in ended:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {status} after {timeout:g} s:\n"
                                 f"{client.get_job_logs(job_id)[-3000:]}")
        time.sleep(poll)
    return status
