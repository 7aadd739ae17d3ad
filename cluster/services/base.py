"""What the stack (cluster/stack.py) asks of each of its services; one module per service subclasses it."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol


class Stack(Protocol):
    """What a service reads of the stack's settings (cluster.stack.Stack has them all): the stack imports the
    services, never the other way round."""

    state_dir: Path
    s3_port: int
    mlflow_port: int
    ray_dashboard_port: int
    ray_gcs_port: int
    ray_client_port: int
    ray_agent_port: int
    num_cpus: int
    bucket: str
    ray_temp_dir: Path | None
    jobs_user: str

    def secret(self, name: str) -> str: ...

    def env(self) -> dict[str, str]: ...

    def ports(self) -> dict[str, int]: ...

    def base_env(self) -> dict[str, str]: ...


class Service:
    """One service of the stack, stateless: its settings are the Stack's fields, its files in the Stack's state dir."""

    name: ClassVar[str]
    ports: ClassVar[dict[str, str]]  # the Stack's port fields it listens on -> their environment variables
    needs: ClassVar[tuple[str, ...]] = ()  # the services it cannot work without (`up` starts them too)
    files: ClassVar[tuple[str, ...]] = ()  # its private files in the state dir (0600, also with a suffix: -journal)
    dirs: ClassVar[tuple[str, ...]] = ()  # its private folders in the state dir (0700)

    def command(self, st: Stack) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that start it (in the state dir, its output in its log)."""
        raise NotImplementedError

    def probe(self, st: Stack) -> tuple[bool, str]:
        """(healthy, what was seen)."""
        raise NotImplementedError

    def url(self, st: Stack) -> str:
        """Where it answers, for status lines."""
        raise NotImplementedError

    def check(self, st: Stack) -> None:
        """Raise StackError when the settings cannot work (before anything starts)."""

    def warning(self, st: Stack) -> str | None:
        """What `status` says is wrong around it (a running service may still fail on it), or None."""
        return None

    def prepare(self, st: Stack) -> str | None:
        """Set-up before it starts; returns a line to show, or None."""
        return None

    def ready(self, st: Stack) -> None:
        """Set-up once it answers its probe (after every `up` that waits for it)."""

    def refusal(self, seen: str) -> str | None:
        """What is wrong when the probe saw `seen` that waiting will not mend, or None."""
        return None

    def stopped(self, st: Stack) -> None:
        """Clean-up once its processes are gone."""
