"""Where outputs live. Write-then-rename helpers: an output is either complete or absent, never half-written;
under an object-storage output_dir (s3://...), the same files are mirrored to and from the store (see below)."""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def _renamed_into(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds, then (under an
    object-storage output) upload the complete file as one object."""
    path = Path(path)
    with _renamed_into(path) as tmp:
        yield tmp
        if remote(path) is not None:  # before the rename: a reader must never pair the new file with the old version
            _version_file(path).unlink(missing_ok=True)
    upload(path)


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    import torch  # here, not at the top: oal.config reads the store too and stays free of torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


class CorruptFileError(ValueError):
    """A file that exists but does not load: cut short, overwritten with something else, or holding pickled code."""


def load_torch(path: str | os.PathLike, what: str) -> Any:
    """torch.load of tensors and plain containers only (`weights_only=True`: a file that would run pickled code is
    refused, never executed), with one clear error for a missing or unreadable file."""
    import torch

    path = pull(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{uri(path)}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CorruptFileError(f"{what} '{uri(path)}' is corrupt, cut short or not a plain torch file of tensors "
                               f"({type(e).__name__}: {first})") from None


def size(path: str | os.PathLike) -> int | None:
    """The file's size in bytes, asked of the store for an s3:// URI or a mirror path; None when absent."""
    path = local(path)
    loc = remote(path)
    if loc is None:
        return path.stat().st_size if path.is_file() else None
    head = _head(*loc)
    return None if head is None else int(head["ContentLength"])


def sha256(path: str | os.PathLike) -> str:
    """Hex digest of the file's bytes (fetched first under an object-storage output)."""
    import hashlib

    h = hashlib.sha256()
    with open(pull(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def move_aside(path: str | os.PathLike, reason: str) -> Path:
    """Rename a partial or unreadable file to `<name>.<reason>-<n>` beside it (in the store too, under an
    object-storage output), so that nothing reads it again and nothing is lost; returns the new path."""
    path = local(path)
    n = 0
    while exists(path.with_name(f"{path.name}.{reason}-{n}")):
        n += 1
    target = path.with_name(f"{path.name}.{reason}-{n}")
    loc = remote(path)
    if loc is None:
        os.replace(path, target)
        return target
    new = remote(target)
    assert new is not None
    client().copy_object(Bucket=new[0], Key=new[1], CopySource={"Bucket": loc[0], "Key": loc[1]})
    client().delete_object(Bucket=loc[0], Key=loc[1])
    path.unlink(missing_ok=True)
    _version_file(path).unlink(missing_ok=True)
    return target


# ---- object storage: output_dir=s3://bucket/prefix -------------------------------------------------------------
#
# Stages keep reading and writing plain files, in a local mirror of the output prefix on every node
# (<OAL_OBJECT_CACHE>/s3/<bucket>/<key>, default ~/.cache/oal/objects/s3/...). The object store is the truth:
#   - every file written under the mirror (through `atomic_path`, so `save_torch`, `write_text`, `write_json`) is
#     uploaded whole as soon as it is complete; an object is either there whole or absent, never partial, and as a
#     stage writes its manifest last, the manifest's object is uploaded last;
#   - `load_torch` and `pull` fetch a file the mirror lacks, or holds in another version (the object's ETag, kept
#     beside the mirror under <cache>/versions/, differs), and drop a mirror file whose object is gone;
#   - `exists`, `read_text` and `listing` ask the store, so a node never trusts a file only its own mirror has.
# A node that never saw the run (a fresh worker, another machine) finds every finished stage by its manifest.
# Paths cross processes as mirror paths, so every process of a job uses the driver's cache root (jobs.common
# hands it to each Ray task, training worker and trial: `OAL_OBJECT_CACHE`).

OBJECT_CACHE_ENV = "OAL_OBJECT_CACHE"
SYNC_THREADS = 16  # downloads at a time when a node fetches a dataset (and the client's connection pool)
SCHEMES = ("s3",)


def is_uri(value: object) -> bool:
    return "://" in str(value)


def cache_root() -> Path:
    """Where object-storage outputs are mirrored on this node (the same on every node of a cluster: the
    default, or the env var set through the job's runtime_env)."""
    root = os.environ.get(OBJECT_CACHE_ENV) or Path.home() / ".cache" / "oal" / "objects"
    return Path(root).expanduser().resolve()


def mirror(uri: str) -> Path:
    """The local mirror path of `s3://bucket/key`."""
    scheme, _, rest = str(uri).partition("://")
    if scheme not in SCHEMES or not rest.strip("/"):
        raise ValueError(f"'{uri}' is not an object-storage URI this project reads; expected s3://bucket/prefix")
    return cache_root() / scheme / rest.strip("/")


def remote(path: str | os.PathLike) -> tuple[str, str] | None:
    """(bucket, key) of a mirror path; None for any other path (a plain local or mounted file)."""
    try:
        rel = Path(path).resolve().relative_to(cache_root() / "s3")
    except ValueError:
        return None
    if len(rel.parts) < 2:
        return None
    return rel.parts[0], "/".join(rel.parts[1:])


def local(value: str | os.PathLike) -> Path:
    """The path to read `value` at on this node: its mirror for an s3:// URI, else the path itself."""
    return mirror(str(value)) if is_uri(value) else Path(value)


def uri(path: str | os.PathLike) -> str:
    """`s3://bucket/key` for a mirror path, the path itself otherwise (for logs and MLflow tags)."""
    loc = remote(path)
    return f"s3://{loc[0]}/{loc[1]}" if loc else str(path)


_clients: dict[tuple, Any] = {}


def client() -> Any:
    """A boto3 S3 client from the standard sources (AWS_* env vars, ~/.aws, an instance role; the endpoint from
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL). OAL_S3_TIMEOUT (s, default 60) and OAL_S3_ATTEMPTS (default 5) bound
    how long a write waits for a stopped server before the stage fails."""
    import boto3
    from botocore.config import Config

    timeout, attempts = float(os.environ.get("OAL_S3_TIMEOUT", 60)), int(os.environ.get("OAL_S3_ATTEMPTS", 5))
    key = (os.getpid(), timeout, attempts, os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ACCESS_KEY_ID"))
    if key not in _clients:  # a client per process (not fork-safe) and per setting
        import logging

        logging.getLogger("botocore").setLevel(logging.WARNING)  # not one INFO line per client about its sources
        # a session of its own: boto3's default one keeps the credentials it first found in the environment
        _clients[key] = boto3.session.Session().client("s3", config=Config(connect_timeout=timeout, read_timeout=timeout,
                                                         retries={"max_attempts": attempts, "mode": "standard"},
                                                         max_pool_connections=SYNC_THREADS))
    return _clients[key]


def _missing(e: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def _head(bucket: str, key: str) -> dict | None:
    try:
        return client().head_object(Bucket=bucket, Key=key)
    except Exception as e:
        if _missing(e):
            return None
        raise


def _version_file(path: Path) -> Path:
    return cache_root() / "versions" / path.resolve().relative_to(cache_root())


def _mark(path: Path, head: dict) -> str:
    """What the version file of a mirror file holding the object `head` describes says."""
    return f"{head['ETag']} {path.stat().st_size}"


def _stamp(path: Path, head: dict) -> None:
    """Record which version of the object the mirror file holds (its ETag; written after the file), and give the
    file the object's time (so that a file's size and time, e.g. in a fingerprint, agree on every node)."""
    t = head["LastModified"].timestamp()
    os.utime(path, (t, t))
    v = _version_file(path)
    v.parent.mkdir(parents=True, exist_ok=True)
    v.write_text(_mark(path, head))


def _same(path: Path, head: dict) -> bool:
    v = _version_file(path)
    return path.is_file() and v.is_file() and v.read_text() == _mark(path, head)


def upload(path: str | os.PathLike) -> None:
    """Put a complete mirror file into the store (one object, visible only once whole)."""
    loc = remote(path)
    if loc is None:
        return
    _version_file(Path(path)).unlink(missing_ok=True)  # until the store holds it, the file is no known version
    client().upload_file(str(path), *loc)
    head = _head(*loc)
    if head is not None:
        _stamp(Path(path), head)


def pull(path: str | os.PathLike) -> Path:
    """Make the mirror hold the store's version of `path` (an s3:// URI or its mirror path; a no-op for other
    paths). When the store has no such object, a mirror file of that name is stale (the object was deleted to
    force a recompute, or its upload failed): it is removed, so that no reader takes it for the store's."""
    path = local(path)
    loc = remote(path)
    if loc is None:
        return path
    head = _head(*loc)
    if head is None:
        if path.is_file():
            path.unlink(missing_ok=True)
            _version_file(path).unlink(missing_ok=True)
        return path
    if _same(path, head):
        return path
    with _renamed_into(path) as tmp:  # not atomic_path: that would upload it again
        client().download_file(*loc, str(tmp))
    _stamp(path, head)
    return path


def _objects(bucket: str, prefix: str) -> Iterator[tuple[str, dict]]:
    """(key relative to `prefix`, the listing's entry: ETag, Size, LastModified) of every object under it."""
    for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield obj["Key"][len(prefix):], obj


def listing(folder: str | os.PathLike, pattern: str = "**") -> list[Path]:
    """The files under `folder` whose path relative to it matches the glob `pattern` ("**": all), sorted; for a
    mirror folder (or its s3:// URI) as the store lists them, without fetching any."""
    folder = local(folder)
    loc = remote(folder)
    if loc is None:
        return sorted(p for p in (folder.rglob("*") if pattern == "**" else folder.glob(pattern)) if p.is_file())
    found = []
    for rel, _ in _objects(loc[0], loc[1].rstrip("/") + "/"):
        # fnmatch's * also matches "/": a pattern matches only as many levels as it names
        if pattern == "**" or (fnmatch.fnmatchcase(rel, pattern) and rel.count("/") == pattern.count("/")):
            found.append(folder / rel)
    return sorted(found)


def inventory(folder: str | os.PathLike) -> dict[str, str]:
    """Every file under `folder` (a local folder, an s3:// prefix or its mirror) by its path relative to it, with
    what identifies its content: the ETag in the store, size and modification time on disk. One listing; nothing
    is fetched. Its digest is a dataset's identity in stage fingerprints."""
    folder = local(folder)
    loc = remote(folder)
    if loc is None:
        return {p.relative_to(folder).as_posix(): f"{st.st_size}:{st.st_mtime_ns}"
                for p in sorted(folder.rglob("*")) if p.is_file() and (st := p.stat())}
    return {rel: obj["ETag"] for rel, obj in _objects(loc[0], loc[1].rstrip("/") + "/")}


def sync(folder: str | os.PathLike, wanted: set[str] | None = None, threads: int = SYNC_THREADS) -> dict[str, Path]:
    """The files under `folder` (or only the relative paths in `wanted`) by relative path, readable on this node:
    for an s3:// prefix each object is fetched into this node's mirror unless the mirror already holds the store's
    version (one listing, no request per unchanged object; `threads` downloads at a time); a local folder is read
    where it is. A wanted path that is not there is left out of the answer."""
    from concurrent.futures import ThreadPoolExecutor

    folder = local(folder)
    loc = remote(folder)
    if loc is None:
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return {k: v for k, v in files.items() if wanted is None or k in wanted}
    entries = {rel: obj for rel, obj in _objects(loc[0], loc[1].rstrip("/") + "/")
               if wanted is None or rel in wanted}

    def fetch(rel: str) -> None:
        path, obj = folder / rel, entries[rel]
        with _renamed_into(path) as tmp:
            client().download_file(loc[0], f"{loc[1].rstrip('/')}/{rel}", str(tmp))
        _stamp(path, obj)

    stale = [rel for rel, obj in entries.items() if not _same(folder / rel, obj)]
    if stale:
        import logging
        import time

        log = logging.getLogger("oal.storage")
        size = sum(int(entries[rel].get("Size", 0)) for rel in stale)
        log.info("fetching %d of %d objects (%.1f MB) under %s into this node's cache %s", len(stale), len(entries),
                 size / 1e6, uri(folder), cache_root())
        t0 = time.perf_counter()
        client()  # made once here: boto3's client creation is not thread-safe, its use is
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fetch, stale))
        log.info("fetched %d objects under %s in %.1f s", len(stale), uri(folder), time.perf_counter() - t0)
    return {rel: folder / rel for rel in sorted(entries)}


def pull_dir(path: str | os.PathLike) -> Path:
    """`pull` every object under a mirror folder (e.g. before logging a stage's files to MLflow)."""
    for f in listing(path):
        pull(f)
    return local(path)


def exists(path: str | os.PathLike) -> bool:
    """Whether the file exists: in the store for an s3:// URI or a mirror path, on disk otherwise."""
    path = local(path)
    loc = remote(path)
    return path.exists() if loc is None else _head(*loc) is not None


def read_text(path: str | os.PathLike) -> str | None:
    """A small file's text, straight from the store for an s3:// URI or a mirror path; None when absent."""
    path = local(path)
    loc = remote(path)
    if loc is None:
        return path.read_text() if path.is_file() else None
    try:
        return client().get_object(Bucket=loc[0], Key=loc[1])["Body"].read().decode()
    except Exception as e:
        if _missing(e):
            return None
        raise


def credential_source() -> str:
    """Where boto3 finds credentials, in words (for error messages)."""
    import boto3

    creds = boto3.Session().get_credentials()
    if creds is None:
        return "no credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, an instance role)"
    names = {"env": "the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
             "shared-credentials-file": "~/.aws/credentials (AWS_SHARED_CREDENTIALS_FILE)",
             "config-file": "~/.aws/config", "iam-role": "the instance's IAM role",
             "container-role": "the container's IAM role", "assume-role": "an assumed role (~/.aws/config)"}
    return f"credentials from {names.get(creds.method, creds.method)}"


def check_bucket(output_uri: str) -> None:
    """Fail at once, naming the bucket and the credential source, when an s3:// output_dir cannot be written:
    the bucket does not exist, the credentials are refused (to read, or only to write: a small object is put
    under the prefix and deleted), or the endpoint does not answer. A no-op for a local output_dir."""
    from botocore.exceptions import BotoCoreError, ClientError

    if not is_uri(output_uri):
        return
    bucket, _, prefix = str(output_uri).partition("://")[2].partition("/")
    c = client()
    endpoint = c.meta.endpoint_url
    where = f"output_dir '{output_uri}': bucket '{bucket}' at {endpoint}"
    probe = f"{prefix.strip('/')}/.oal-write-check-{uuid.uuid4().hex}".lstrip("/")
    try:
        c.head_bucket(Bucket=bucket)
        c.put_object(Bucket=bucket, Key=probe, Body=b"")
        try:
            c.delete_object(Bucket=bucket, Key=probe)
        except ClientError:  # a writer that may not delete leaves an empty probe object: harmless
            pass
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code"))
        if code in ("404", "NoSuchBucket"):
            raise ValueError(f"{where} does not exist (checked with {credential_source()}); create it "
                             f"(`aws s3 mb s3://{bucket}`) or name another") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "401"):
            raise ValueError(f"{where} refused {credential_source()} ({code} on {e.operation_name}); set credentials "
                             f"that may read and write it") from None
        raise ValueError(f"{where}: {code} {e} ({credential_source()})") from None
    except BotoCoreError as e:  # no credentials, endpoint not answering
        raise ValueError(f"{where} cannot be reached ({e}; {credential_source()})") from None
