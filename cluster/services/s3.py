"""The stack's S3 server: SeaweedFS (`weed mini`), objects on disk in `<state-dir>/s3`, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

from cluster.procs import HOST, StackError, exe, http_get, port_free, private_dir, write_private
from cluster.services.base import Service, Stack
from cluster.services.ray import RAY_WORKER_PORTS

REGION = "us-east-1"
# SeaweedFS's volume server marks every volume read-only when less than this share of its disk is free (the default of
# `weed volume -minFreeSpace`, which `weed mini` keeps); a new volume takes up to VOLUME_MB (`-master.volumeSizeLimitMB`
# of `weed mini`). Short of room, uploads get HTTP 500 or hang: seen on a nearly full disk (MLflow's "too many 500
# error responses"), and as the S3 INTERNAL_FAILUREs of one CI run.
MIN_FREE_SHARE = 0.01
VOLUME_MB = 128
S3_ACCESS_KEY = "oal-stack"  # the S3 server's access key id (its secret key is generated: secrets.json)
# SeaweedFS's internal servers (`weed mini`), each on a port of its own; their gRPC ports too (the admin server's is
# its HTTP port + 10000, which its maintenance worker assumes). Iceberg, Lance and WebDAV are off.
WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port.grpc", "admin.port")
WEED_GRPC_OFFSET = 10000


def client_env(st: Stack) -> dict[str, str]:
    """The S3 part of the stack's client environment: endpoint, credentials, region."""
    client = st.env()
    return {k: client[k] for k in client if k.startswith(("AWS_", "MLFLOW_S3"))}


class S3(Service):
    name = "s3"
    ports = {"s3_port": "OAL_S3_PORT"}
    dirs = ("s3",)

    def command(self, st: Stack) -> tuple[list[str], dict[str, str]]:
        s3_env = client_env(st)
        data = st.state_dir / "s3"
        private_dir(data)
        ports = weed_ports(st)
        # `weed mini`: master, volume server, filer and S3 gateway in one process, data in `data` (volumes and
        # the filer's LevelDB), every listener on 127.0.0.1, no telemetry; it takes its one S3 identity from
        # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and refuses any other key (and anonymous requests).
        argv = [exe("weed"), "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.port={st.s3_port}",
                *(f"-{flag}={port}" for flag, port in ports.items()), "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-webdav=false", "-admin.ui=false", "-master.telemetry=false"]
        return argv, {**st.base_env(), **s3_env}

    def check(self, st: Stack) -> None:
        if short := self.warning(st):
            raise StackError(short)

    def warning(self, st: Stack) -> str | None:
        return disk_shortage(st.state_dir / "s3")

    def probe(self, st: Stack) -> tuple[bool, str]:
        code, _ = http_get(f"http://{HOST}:{st.s3_port}/healthz")  # anonymous S3 requests get 403
        if code != 200:
            return False, f"HTTP {code}"
        # The gateway answers before its volume server has reported to its master; until then every object
        # stored in a volume (all but the smallest) is an InternalError. Ready once the master locates each
        # volume on disk (seen after a SIGKILL: one start in six served `volume 1 not found` for ~0.1 s).
        missing = unlocated_volumes(st.state_dir / "s3")
        return not missing, f"volumes {', '.join(map(str, missing))} not located yet" if missing else "HTTP 200"

    def url(self, st: Stack) -> str:
        return f"http://{HOST}:{st.s3_port}  bucket {st.bucket}  data {st.state_dir / 's3'}"

    def ready(self, st: Stack) -> None:
        """The bucket, created unless it is there."""
        import boto3
        from botocore.exceptions import ClientError

        env = st.env()
        s3 = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], region_name=REGION,
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        try:
            s3.create_bucket(Bucket=st.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def stopped(self, st: Stack) -> None:
        """The Unix sockets a stopped S3 server leaves in /tmp (`/tmp/seaweedfs-<server>-<port>.sock`)."""
        try:
            ports = json.loads((st.state_dir / "s3" / "ports.json").read_text())
        except (OSError, ValueError):
            return
        ports = {int(p) for p in ports.values()} | {st.s3_port, int(ports.get("admin.port", 0)) + WEED_GRPC_OFFSET}
        for path in Path("/tmp").glob("seaweedfs-*.sock"):
            port = path.stem.rsplit("-", 1)[-1]
            if port.isdigit() and int(port) in ports and path.is_socket() and path.stat().st_uid == os.getuid():
                path.unlink(missing_ok=True)


def disk_shortage(data: Path) -> str | None:
    """What is wrong when the disk under `data` (the S3 server's objects) lacks the room SeaweedFS needs to store
    anything (MIN_FREE_SHARE of it, and two volumes), or None."""
    where = next(p for p in (data, *data.parents) if p.exists())
    disk, mib = shutil.disk_usage(where), 2**20
    need = disk.total * MIN_FREE_SHARE + 2 * VOLUME_MB * mib
    if disk.free >= need:
        return None
    return (f"the S3 server's data folder {data} lies on a disk with {disk.free / mib:,.0f} MiB free of "
            f"{disk.total / mib:,.0f} MiB; SeaweedFS stores nothing with less than {MIN_FREE_SHARE:.0%} of its disk "
            f"free and needs room for new volumes ({VOLUME_MB} MiB each): at least {need / mib:,.0f} MiB free here. "
            f"Free space on that disk, or give the stack a state dir on another one (--state-dir or OAL_STACK_DIR)")


def unlocated_volumes(data: Path) -> list[int]:
    """The S3 server's volumes on disk (`[collection_]N.dat` in `data`) that its master cannot locate yet."""
    try:
        master = int(json.loads((data / "ports.json").read_text())["master.port"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no ports recorded: nothing was ever stored
    ids = sorted({int(m.group(1)) for f in data.glob("*.dat") if (m := re.fullmatch(r"(?:.*_)?(\d+)\.dat", f.name))})
    return [v for v in ids if http_get(f"http://{HOST}:{master}/dir/lookup?volumeId={v}")[0] != 200]


def weed_ports(st: Stack) -> dict[str, int]:
    """The S3 server's internal ports: those of its last start (kept in s3/ports.json) while they are free,
    else new ones the kernel picks (outside Ray's worker range), the admin's gRPC port (+10000) free too."""
    path = st.state_dir / "s3" / "ports.json"
    try:
        ports = {k: int(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        ports = {}
    wanted = set(WEED_PORTS)
    if set(ports) != wanted or not all(port_free(p) for p in _with_grpc(ports)):
        ports = _pick_weed_ports(exclude=set(st.ports().values()))
        write_private(path, json.dumps(ports, indent=1) + "\n")
    return ports


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
                                              or not port_free(port + WEED_GRPC_OFFSET))):
                port = grab()
            ports[flag] = port
        return ports
    finally:
        for s in socks:
            s.close()
