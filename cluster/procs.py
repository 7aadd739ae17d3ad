"""What the local stack (cluster/stack.py) does with processes and files, whatever the service: private files and
folders, pid files with the process's start time, starting a service in its own session and stopping its process
group, port and HTTP probes on loopback. Standard library only (`python -m cluster.stack mlflow-user` runs in an
image with nothing else)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

HOST = "127.0.0.1"
STOP_WAIT_S = 45.0  # `ray start --block` drains for up to 30 s on SIGTERM
UMASK = 0o077  # every file the stack and its services create is its owner's alone
# Health checks only ever talk to loopback: never through a proxy from the environment.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StackError(RuntimeError):
    """A service could not be started or reached; the message names it and says why."""


# -------------------------------------------------------------------- files


def exe(name: str) -> str:
    here = Path(sys.executable).parent / name  # the virtualenv this module runs in
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found: install the dev extras (pip install -e '.[dev]')")
    return found


def private_dir(path: Path) -> None:
    """A folder only its owner may enter (0700), created if missing."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def write_private(path: Path, text: str) -> None:
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


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -------------------------------------------------------------------- probes


def http_get(url: str, token: str | None = None, timeout: float = 3.0) -> tuple[int, str]:
    """(HTTP status or 0 when nothing answers, start of the body)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with HTTP.open(req, timeout=timeout) as r:
            return r.status, r.read(65536).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (OSError, ValueError):
        return 0, ""


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT socket is not a running service
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


# -------------------------------------------------------------------- processes

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


def start_time(pid: int) -> str | None:
    stat = _stat(pid)
    return stat[19] if stat else None


def alive(pid: int, start: str | None) -> bool:
    """Alive and the same process that was recorded (pids get reused)."""
    if _PROC:
        now = start_time(pid)
        return now is not None and (start is None or now == start)
    return not gone(pid)


def gone(pid: int) -> bool:
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


def group_exists(pgid: int) -> bool:
    """Some live process is in this process group."""
    if _PROC:
        return any((stat := _stat(int(d.name))) and stat[2] == str(pgid)
                   for d in Path("/proc").iterdir() if d.name.isdigit())
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def send_signal(pid: int, sig: signal.Signals, group: bool) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def write_pidfile(path: Path, pid: int) -> None:
    """The pid and its start time (which tells a reused pid from the process), in a private file."""
    write_private(path, json.dumps({"pid": pid, "start": start_time(pid)}))


def read_pidfile(path: Path) -> tuple[int, str | None] | None:
    """(pid, start time) from a pid file, or None when there is none."""
    try:
        data = json.loads(path.read_text())
        return int(data["pid"]), data.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def spawn(argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own, its output in `log` (private, truncated)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as out:
        # Own session: `down` can signal the whole process group, and a Ctrl-C on `up` does not reach it.
        # umask: what the service writes later (databases, journals, S3 volumes, Ray's session files) is private.
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True, umask=UMASK)


def stop_groups(leaders: Mapping[str, tuple[int, str | None]],
                children: Mapping[str, subprocess.Popen[bytes]]) -> dict[str, bool]:
    """Stop these process groups (name -> its leader's pid and start time), all at once: SIGTERM to each leader
    still alive, up to STOP_WAIT_S for them to exit, then SIGTERM and 5 s later SIGKILL to what is left in their
    groups. `children`: our own processes among them, reaped once exited. Name -> whether its leader was running."""
    targets: dict[str, tuple[int, str | None, bool]] = {}
    for name, rec in leaders.items():
        targets[name] = (*rec, alive(*rec))
        if targets[name][2]:
            # The leader stops its children in order: `ray start --block` drains the node, `mlflow server`
            # forwards the signal to uvicorn.
            send_signal(rec[0], signal.SIGTERM, group=False)
    deadline = time.monotonic() + STOP_WAIT_S
    while any(running and alive(pid, start) for pid, start, running in targets.values()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for name in targets:
        if name in children:
            children[name].poll()  # reap our own exited child
    # A process group id cannot be reused while any member lives, so what is left in it is ours.
    groups = [pid for pid, _, running in targets.values() if running or gone(pid)]
    for pgid in groups:
        send_signal(pgid, signal.SIGTERM, group=True)
    deadline = time.monotonic() + 5
    while any(group_exists(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pgid in groups:
        send_signal(pgid, signal.SIGKILL, group=True)
    return {name: running for name, (_, _, running) in targets.items()}
