"""oal.storage without any server: the write-then-rename helpers on local paths, save/load errors, JSON and text
output, listings, the s3:// <-> mirror mapping, and the mirror logic against an in-memory stand-in for the S3
client (`FakeS3`). The real S3 server's tests are in test_storage.py (marker `stack`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from botocore.exceptions import ClientError, EndpointConnectionError

from oal import storage


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test's own mirror root; no test touches ~/.cache or a real store."""
    root = tmp_path / "cache"
    monkeypatch.setenv(storage.OBJECT_CACHE_ENV, str(root))
    monkeypatch.setattr(storage, "client", _no_client)
    return root.resolve()


def _no_client():
    raise AssertionError("a local path must never reach the object store")


def _tmp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


# ---- write-then-rename ------------------------------------------------------------------------------------

@pytest.mark.parametrize("helper", [storage._renamed_into, storage.atomic_path])
def test_block_that_succeeds_replaces_the_target(tmp_path, helper):
    target = tmp_path / "deep" / "er" / "out.txt"  # parents are made
    with helper(target) as tmp:
        assert tmp != target and tmp.parent == target.parent  # beside it: the rename stays on one file system
        assert tmp.name.startswith(".out.txt.") and tmp.name.endswith(".tmp")  # hidden, named after the target
        assert tmp.is_file()  # reserved at once (mkstemp), so that two writers never share it
        tmp.write_text("new")
        assert not target.exists()  # nothing at the target until the block is done
    assert target.read_text() == "new"
    assert list(target.parent.iterdir()) == [target]  # the temporary file is gone


@pytest.mark.parametrize("helper", [storage._renamed_into, storage.atomic_path])
def test_block_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, helper):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with helper(target) as tmp:
            tmp.write_text("half")
            assert target.read_text() == "old"  # never written straight to the target
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("helper", [storage._renamed_into, storage.atomic_path])
def test_block_that_fails_leaves_no_target_where_there_was_none(tmp_path, helper):
    target = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt):
        with helper(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt  # not only Exception: an interrupt, too
    assert list(tmp_path.iterdir()) == []


def test_block_that_deletes_its_temporary_fails_and_leaves_the_target(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(FileNotFoundError):
        with storage.atomic_path(target) as tmp:
            tmp.unlink()
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_atomic_path_accepts_a_string(tmp_path):
    with storage.atomic_path(str(tmp_path / "s.txt")) as tmp:
        assert isinstance(tmp, Path)
        tmp.write_text("x")
    assert (tmp_path / "s.txt").read_text() == "x"


# ---- save/load, text, JSON ----------------------------------------------------------------------------------

def test_save_and_load_torch_round_trip(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "fingerprint": "abc", "history": [{"a": 1.5}]}
    path = tmp_path / "sub" / "ckpt.pt"
    storage.save_torch(obj, path)
    back = storage.load_torch(path, "checkpoint")
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and back["model"]["w"].device.type == "cpu"
    assert {k: v for k, v in back.items() if k != "model"} == {"epoch": 3, "fingerprint": "abc", "history": [{"a": 1.5}]}
    assert list(path.parent.iterdir()) == [path]
    assert storage.load_torch(str(path), "checkpoint")["epoch"] == 3  # a str path too


def test_save_torch_that_fails_keeps_the_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    storage.save_torch({"v": 1}, path)
    with pytest.raises(Exception):  # noqa: B017  (pickle's error type: whatever torch.save raises)
        storage.save_torch({"v": 2, "bad": lambda: 0}, path)  # a lambda cannot be pickled
    assert storage.load_torch(path, "checkpoint") == {"v": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_load_torch_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        storage.load_torch(tmp_path / "none.pt", "teacher checkpoint")
    assert str(e.value) == f"teacher checkpoint '{tmp_path / 'none.pt'}' does not exist"
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a folder is no file
        storage.load_torch(tmp_path / "folder.pt", "x")


@pytest.mark.parametrize("content", [b"", b"half written", b"PK\x03\x04broken zip"])
def test_load_torch_names_a_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        storage.load_torch(path, "k-NN outliers")
    msg = str(e.value)
    assert msg.startswith(f"k-NN outliers '{path}' is corrupt") and "torch file" in msg  # names what and where
    assert msg.endswith(")")  # the cause in brackets, after the sentence
    assert e.value.__cause__ is None and e.value.__suppress_context__  # one message, not torch's chain


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint in a shared bucket could do."""

    def __reduce__(self):
        return (os.system, ("touch ran-by-unpickling",))


def test_load_torch_refuses_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _RunsCode()}, path)
    with pytest.raises(ValueError, match=f"^checkpoint '{path}' is corrupt"):
        storage.load_torch(path, "checkpoint")
    assert not (tmp_path / "ran-by-unpickling").exists()  # refused before anything ran
    storage.save_torch({"plain": [1, 2.5, "a", None, (3,)], "t": torch.zeros(1, dtype=torch.int64)}, path)
    assert storage.load_torch(path, "x")["plain"] == [1, 2.5, "a", None, (3,)]  # tensors and plain data load


def test_load_torch_of_a_truncated_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    storage.save_torch({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"^checkpoint '{path}' is corrupt"):
        storage.load_torch(path, "checkpoint")


def test_write_text_and_json(tmp_path):
    storage.write_text("héllo\n", tmp_path / "a" / "t.txt")
    assert (tmp_path / "a" / "t.txt").read_text() == "héllo\n"
    storage.write_json({"b": 1, "a": [1, 2], "p": Path("/x/y"), "n": {"z": None, "y": 0.5}}, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    # sorted keys, indent 2, a trailing newline; what JSON lacks (a Path) written as its str
    assert text == ('{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1,\n  "n": {\n    "y": 0.5,\n    "z": null\n  },\n'
                    '  "p": "/x/y"\n}\n')
    assert json.loads(text)["p"] == "/x/y"
    storage.write_json([1], tmp_path / "r.json")  # replaces
    assert json.loads((tmp_path / "r.json").read_text()) == [1]
    assert not _tmp_files(tmp_path)


# ---- local listings and files -------------------------------------------------------------------------------

def _tree(root: Path) -> Path:
    for rel in ("b.pt", "a.pt", "notes.txt", "sub/c.pt", "sub/deeper/d.pt", "sub/e.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    (root / "empty_dir").mkdir()
    return root


def test_listing_of_a_local_folder(tmp_path):
    root = _tree(tmp_path / "run")
    rel = lambda ps: [p.relative_to(root).as_posix() for p in ps]  # noqa: E731
    assert rel(storage.listing(root)) == ["a.pt", "b.pt", "notes.txt", "sub/c.pt", "sub/deeper/d.pt", "sub/e.txt"]
    assert rel(storage.listing(root, "*.pt")) == ["a.pt", "b.pt"]  # one level: glob's rules
    assert rel(storage.listing(root, "sub/*.pt")) == ["sub/c.pt"]
    assert rel(storage.listing(str(root), "**/*.txt")) == ["notes.txt", "sub/e.txt"]
    assert storage.listing(root, "*_dir") == []  # folders are never listed
    assert storage.listing(tmp_path / "absent") == []
    assert storage.pull_dir(root) == root  # a local folder: nothing to fetch


def test_exists_read_text_pull_upload_on_local_paths(tmp_path):
    f = tmp_path / "x.txt"
    assert not storage.exists(f) and storage.read_text(f) is None
    f.write_text("hi")
    assert storage.exists(f) and storage.exists(str(f)) and storage.read_text(f) == "hi"
    assert storage.exists(tmp_path)  # a folder exists too
    assert storage.read_text(tmp_path) is None  # but has no text
    assert storage.pull(f) == f and storage.pull(str(f)) == f and f.read_text() == "hi"
    storage.upload(f)  # no-op (the autouse fixture fails any call to the store)
    storage.check_bucket(str(tmp_path))  # a local output_dir: nothing to check


# ---- s3:// <-> mirror mapping -------------------------------------------------------------------------------

def test_uri_and_mirror_mapping(cache, monkeypatch):
    assert storage.is_uri("s3://b/k") and storage.is_uri("gs://b") and not storage.is_uri("/tmp/x")
    assert not storage.is_uri(Path("runs/x"))
    assert storage.cache_root() == cache
    m = storage.mirror("s3://bkt/run/x.pt")
    assert m == cache / "s3" / "bkt" / "run" / "x.pt"
    assert storage.mirror("s3://bkt/run/") == cache / "s3" / "bkt" / "run"  # slashes around the key dropped
    assert storage.mirror("s3:///bkt/x") == cache / "s3" / "bkt" / "x"
    assert storage.mirror("s3://Xb/runX") == cache / "s3" / "Xb" / "runX"  # only slashes
    assert storage.local("s3://bkt/run/x.pt") == m and storage.local("rel/x.pt") == Path("rel/x.pt")
    assert storage.remote(m) == ("bkt", "run/x.pt") and storage.remote(str(m)) == ("bkt", "run/x.pt")
    assert storage.remote(cache / "s3" / "bkt" / "a" / "b" / "c") == ("bkt", "a/b/c")
    assert storage.remote(cache / "s3" / "bkt") is None  # a bucket alone is no object
    assert storage.remote(cache / "s3") is None and storage.remote(cache / "other" / "b" / "k") is None
    assert storage.remote("/elsewhere/s3/bkt/k") is None
    assert storage.uri(m) == "s3://bkt/run/x.pt" and storage.uri("/tmp/x.pt") == "/tmp/x.pt"
    assert storage.uri(storage.local("s3://bkt/a/b")) == "s3://bkt/a/b"
    assert storage._version_file(m) == cache / "versions" / "s3" / "bkt" / "run" / "x.pt"
    for bad in ("gs://bkt/x", "s3://", "s3:///", "https://host/x"):
        with pytest.raises(ValueError, match="not an object-storage URI this project reads; expected s3://"):
            storage.mirror(bad)


def test_cache_root_default_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv(storage.OBJECT_CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.cache_root() == (tmp_path / "home" / ".cache" / "oal" / "objects").resolve()
    monkeypatch.setenv(storage.OBJECT_CACHE_ENV, "")  # empty: the default
    assert storage.cache_root() == (tmp_path / "home" / ".cache" / "oal" / "objects").resolve()
    monkeypatch.setenv(storage.OBJECT_CACHE_ENV, "~/c")  # ~ expanded
    assert storage.cache_root() == (tmp_path / "home" / "c").resolve()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(storage.OBJECT_CACHE_ENV, "rel")  # made absolute: paths cross processes
    assert storage.cache_root() == tmp_path.resolve() / "rel"


# ---- the mirror against an in-memory store --------------------------------------------------------------------

class FakeS3:
    """The part of boto3's S3 client that oal.storage calls, on a dict. `fail[op] = code` makes `op` raise a
    ClientError with that code; `down` makes every call raise as an endpoint that does not answer."""

    def __init__(self, buckets=("bkt",), page_size=2):
        self.objects: dict[tuple[str, str], tuple[bytes, str, datetime]] = {}
        self.buckets = set(buckets)
        self.page_size = page_size
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, str] = {}
        self.down = False
        self.meta = SimpleNamespace(endpoint_url="http://fake-s3:9000")
        self._clock = datetime(2024, 1, 1, tzinfo=UTC)

    def _op(self, op: str, key: str = "") -> None:
        self.calls.append((op, key))
        if self.down:
            raise EndpointConnectionError(endpoint_url=self.meta.endpoint_url)
        if op in self.fail:  # a code, or None: a response without an "Error" part
            code = self.fail[op]
            raise ClientError({"Error": {"Code": code, "Message": "nope"}} if code else {}, op)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._clock += timedelta(seconds=7)
        self.objects[(bucket, key)] = (data, f'"{hashlib.md5(data).hexdigest()}"', self._clock)

    def _get(self, op: str, bucket: str, key: str, code: str = "404") -> tuple[bytes, str, datetime]:
        if (bucket, key) not in self.objects:
            raise ClientError({"Error": {"Code": code, "Message": "Not Found"}}, op)
        return self.objects[(bucket, key)]

    def head_object(self, Bucket, Key):
        self._op("HeadObject", Key)
        data, etag, t = self._get("HeadObject", Bucket, Key)
        return {"ETag": etag, "LastModified": t, "ContentLength": len(data)}

    def upload_file(self, Filename, Bucket, Key):
        self._op("upload_file", Key)
        self.put(Bucket, Key, Path(Filename).read_bytes())

    def download_file(self, Bucket, Key, Filename):
        self._op("download_file", Key)
        Path(Filename).write_bytes(self._get("GetObject", Bucket, Key)[0])

    def get_object(self, Bucket, Key):
        self._op("GetObject", Key)
        return {"Body": io.BytesIO(self._get("GetObject", Bucket, Key, "NoSuchKey")[0])}

    def get_paginator(self, name):
        assert name == "list_objects_v2"
        return self

    def paginate(self, Bucket, Prefix):
        self._op("ListObjectsV2", Prefix)
        keys = sorted(k for b, k in self.objects if b == Bucket and k.startswith(Prefix))
        for i in range(0, len(keys), self.page_size):
            yield {"Contents": [{"Key": k} for k in keys[i:i + self.page_size]]}
        if not keys:
            yield {"KeyCount": 0}  # S3 leaves out Contents when nothing matches

    def copy_object(self, Bucket, Key, CopySource):
        self._op("CopyObject", Key)
        self.put(Bucket, Key, self._get("CopyObject", CopySource["Bucket"], CopySource["Key"])[0])

    def head_bucket(self, Bucket):
        self._op("HeadBucket")
        if Bucket not in self.buckets:
            raise ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadBucket")

    def put_object(self, Bucket, Key, Body):
        self._op("PutObject", Key)
        self.put(Bucket, Key, Body)

    def delete_object(self, Bucket, Key):
        self._op("DeleteObject", Key)
        self.objects.pop((Bucket, Key), None)


@pytest.fixture
def s3(monkeypatch) -> FakeS3:
    fake = FakeS3()
    monkeypatch.setattr(storage, "client", lambda: fake)
    return fake


def _ops(s3: FakeS3, op: str) -> list[str]:
    return [k for o, k in s3.calls if o == op]


def test_save_torch_under_the_mirror_uploads_the_whole_file_and_stamps_it(s3, cache):
    path = storage.mirror("s3://bkt/run/ckpt.pt")
    storage.save_torch({"w": torch.ones(3)}, path)
    data, etag, t = s3.objects[("bkt", "run/ckpt.pt")]
    assert data == path.read_bytes() and _ops(s3, "upload_file") == ["run/ckpt.pt"]
    version = cache / "versions" / "s3" / "bkt" / "run" / "ckpt.pt"
    assert version.read_text() == f"{etag} {len(data)}"  # which object version the mirror file holds
    assert path.stat().st_mtime == t.timestamp()  # the object's time: the same on every node
    assert storage._same(path, s3.head_object("bkt", "run/ckpt.pt"))
    assert not _tmp_files(cache)


def test_a_failed_write_under_the_mirror_uploads_nothing(s3, cache):
    path = storage.mirror("s3://bkt/run/r.json")
    with pytest.raises(RuntimeError):
        with storage.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert s3.objects == {} and not path.exists() and not _tmp_files(cache)


def test_atomic_path_drops_the_old_version_mark_before_the_rename(s3, cache, monkeypatch):
    path = storage.mirror("s3://bkt/run/r.txt")
    storage.write_text("v1", path)
    version = storage._version_file(path)
    assert version.is_file()
    seen = []
    real = os.replace
    monkeypatch.setattr(storage.os, "replace", lambda a, b: seen.append(version.exists()) or real(a, b))
    storage.write_text("v2", path)
    assert seen == [False]  # a reader never pairs the new file with the old version's mark
    assert s3.objects[("bkt", "run/r.txt")][0] == b"v2" and path.read_text() == "v2"
    assert version.read_text() == f"{s3.objects[('bkt', 'run/r.txt')][1]} 2"


def test_upload_is_only_stamped_when_the_store_holds_the_file(s3, monkeypatch):
    path = storage.mirror("s3://bkt/run/x.txt")
    storage.write_text("one", path)
    version = storage._version_file(path)
    old = version.read_text()
    path.write_text("two")
    monkeypatch.setattr(s3, "upload_file", lambda *a: (_ for _ in ()).throw(ConnectionError("store down")))
    with pytest.raises(ConnectionError):
        storage.upload(path)
    assert old and not version.exists()  # the file is no known version until the store holds it


def test_pull_fetches_a_missing_or_changed_file_and_skips_a_current_one(s3, cache):
    uri = "s3://bkt/run/data.txt"
    s3.put("bkt", "run/data.txt", b"from the store")
    path = storage.pull(uri)
    assert path == storage.mirror(uri) and path.read_bytes() == b"from the store"
    assert _ops(s3, "download_file") == ["run/data.txt"]
    assert path.stat().st_mtime == s3.objects[("bkt", "run/data.txt")][2].timestamp()
    assert storage.pull(path) == path and len(_ops(s3, "download_file")) == 1  # the same version: not fetched again
    s3.put("bkt", "run/data.txt", b"another version")  # another node wrote it
    assert storage.pull(path).read_bytes() == b"another version" and len(_ops(s3, "download_file")) == 2
    path.write_bytes(b"edited in the mirror")  # same ETag, other size: not the store's version
    assert storage.pull(path).read_bytes() == b"another version" and len(_ops(s3, "download_file")) == 3
    storage._version_file(path).unlink()  # a file without a version mark is not trusted either
    assert storage.pull(path).read_bytes() == b"another version" and len(_ops(s3, "download_file")) == 4
    assert not _tmp_files(cache)


def test_pull_removes_a_mirror_file_whose_object_is_gone(s3):
    path = storage.mirror("s3://bkt/run/old.pt")
    storage.save_torch({"v": 1}, path)
    version = storage._version_file(path)
    del s3.objects[("bkt", "run/old.pt")]  # deleted to force a recompute
    assert storage.pull(path) == path
    assert not path.exists() and not version.exists()
    assert storage.pull(path) == path and not path.exists()  # absent everywhere: nothing to do
    path.write_bytes(b"a copy with no version mark")  # e.g. left by an interrupted download
    assert storage.pull(path) == path and not path.exists()
    with pytest.raises(FileNotFoundError) as e:
        storage.load_torch("s3://bkt/run/old.pt", "checkpoint")
    assert str(e.value) == "checkpoint 's3://bkt/run/old.pt' does not exist"  # named by its URI


def test_load_torch_fetches_from_the_store(s3, cache):
    storage.save_torch({"w": torch.arange(4)}, storage.mirror("s3://bkt/run/w.pt"))
    (cache / "s3").rename(cache / "other-node")  # a node that never saw the file
    import shutil

    shutil.rmtree(cache / "versions")
    assert torch.equal(storage.load_torch("s3://bkt/run/w.pt", "weights")["w"], torch.arange(4))


def test_listing_exists_and_read_text_ask_the_store(s3, cache):
    for key in ("run/a.pt", "run/b.pt", "run/sub/c.pt", "run/sub/deep/d.pt", "run/notes.txt", "run2/z.pt"):
        s3.put("bkt", key, key.encode())
    folder = storage.mirror("s3://bkt/run")
    rel = lambda ps: [p.relative_to(folder).as_posix() for p in ps]  # noqa: E731
    everything = ["a.pt", "b.pt", "notes.txt", "sub/c.pt", "sub/deep/d.pt"]  # over pages of 2; never run2/
    assert rel(storage.listing("s3://bkt/run")) == everything == rel(storage.listing(folder, "**"))
    assert rel(storage.listing(folder, "*.pt")) == ["a.pt", "b.pt"]  # * does not cross a /
    assert rel(storage.listing(folder, "sub/*.pt")) == ["sub/c.pt"]
    assert rel(storage.listing(folder, "*/*/*.pt")) == ["sub/deep/d.pt"]
    assert storage.listing("s3://bkt/none") == []
    s3.put("bkt", "runX/y.pt", b"y")  # a folder name ending in any character
    assert [p.name for p in storage.listing("s3://bkt/runX")] == ["y.pt"]
    assert _ops(s3, "ListObjectsV2")[0] == "run/"  # the prefix ends in "/": run2/ is not under run/
    assert not folder.exists()  # listing fetches nothing
    assert storage.pull_dir("s3://bkt/run") == folder
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == everything
    assert storage.exists("s3://bkt/run/a.pt") and not storage.exists("s3://bkt/run/none.pt")
    assert storage.read_text("s3://bkt/run/notes.txt") == "run/notes.txt"
    assert storage.read_text(folder / "none.txt") is None
    (folder / "only_here.txt").write_text("a mirror copy the store never had")
    assert not storage.exists(folder / "only_here.txt") and storage.read_text(folder / "only_here.txt") is None


@pytest.mark.parametrize("op", ["HeadObject", "GetObject"])
def test_store_errors_other_than_missing_are_raised(s3, op):
    s3.put("bkt", "run/a.txt", b"a")
    s3.fail[op] = "403"
    with pytest.raises(ClientError, match="403"):
        storage.read_text("s3://bkt/run/a.txt") if op == "GetObject" else storage.exists("s3://bkt/run/a.txt")
    assert not storage._missing(ClientError({"Error": {"Code": "403"}}, op))
    assert not storage._missing(ValueError("404"))
    assert not storage._missing(ClientError({}, op))  # a response without an "Error" part
    assert all(storage._missing(ClientError({"Error": {"Code": c}}, op)) for c in ("404", "NoSuchKey", "NotFound"))


def test_check_bucket_probes_a_write_and_cleans_up(s3):
    storage.check_bucket("s3://bkt/some/prefix/")
    (put,), (deleted,) = _ops(s3, "PutObject"), _ops(s3, "DeleteObject")
    assert put == deleted and put.startswith("some/prefix/.oal-write-check-") and len(put) == 29 + 32
    assert s3.objects == {}
    storage.check_bucket("s3://bkt")  # the bucket's root: the probe has no leading "/"
    assert _ops(s3, "PutObject")[-1].startswith(".oal-write-check-")
    storage.check_bucket("s3://bkt/Xdir/")  # a prefix starting with any character keeps it
    assert _ops(s3, "PutObject")[-1].startswith("Xdir/.oal-write-check-")
    s3.fail["DeleteObject"] = "AccessDenied"  # may write, not delete: an empty probe is left, no error
    storage.check_bucket("s3://bkt/p")
    assert [k for _, k in s3.objects] == [_ops(s3, "PutObject")[-1]]
    assert [v[0] for v in s3.objects.values()] == [b""]


@pytest.mark.parametrize("fail,message", [
    ({"HeadBucket": "403"}, "refused credentials from .* \\(403 on HeadBucket\\); set credentials that may read and write"),
    ({"PutObject": "AccessDenied"}, "refused .* \\(AccessDenied on PutObject\\)"),
    ({"HeadBucket": "InvalidAccessKeyId"}, "refused"),
    ({"HeadBucket": "SignatureDoesNotMatch"}, "refused"),
    ({"HeadBucket": "401"}, "refused"),
    ({"HeadBucket": "NoSuchBucket"}, "does not exist"),
    ({"HeadBucket": "500"}, "output_dir 's3://bkt/p': bucket 'bkt' at http://fake-s3:9000: 500 "),
    ({"HeadBucket": None}, "output_dir 's3://bkt/p': bucket 'bkt' at http://fake-s3:9000: None "),
])
def test_check_bucket_errors(s3, monkeypatch, fail, message):
    monkeypatch.setattr(storage, "credential_source", lambda: "credentials from the test")
    s3.fail.update(fail)
    with pytest.raises(ValueError, match=message) as e:
        storage.check_bucket("s3://bkt/p")
    assert str(e.value).startswith("output_dir 's3://bkt/p': bucket 'bkt' at http://fake-s3:9000")
    assert "credentials from the test" in str(e.value) and e.value.__cause__ is None


def test_check_bucket_missing_bucket_and_dead_endpoint(s3, monkeypatch):
    monkeypatch.setattr(storage, "credential_source", lambda: "credentials from the test")
    with pytest.raises(ValueError) as e:
        storage.check_bucket("s3://other/p")
    assert str(e.value) == ("output_dir 's3://other/p': bucket 'other' at http://fake-s3:9000 does not exist (checked "
                            "with credentials from the test); create it (`aws s3 mb s3://other`) or name another")
    s3.down = True
    with pytest.raises(ValueError, match=r"bucket 'bkt' at http://fake-s3:9000 cannot be reached \(Could not connect"):
        storage.check_bucket("s3://bkt/p")


def test_credential_source_names_where_keys_come_from(tmp_path, monkeypatch):
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    assert storage.credential_source() == "credentials from the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert storage.credential_source().startswith("no credentials found")


def test_client_is_cached_per_process_and_setting(monkeypatch):
    monkeypatch.undo()  # the real client(), not the fixture's guard
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    monkeypatch.setenv("OAL_S3_TIMEOUT", "7")
    monkeypatch.setenv("OAL_S3_ATTEMPTS", "2")
    monkeypatch.setattr(storage, "_clients", {})
    import logging

    botocore_log = logging.getLogger("botocore")
    monkeypatch.setattr(botocore_log, "level", logging.DEBUG)
    a = storage.client()
    assert botocore_log.level == logging.WARNING  # not one INFO line per client about its credential source
    assert storage.client() is a
    assert a.meta.config.connect_timeout == 7 and a.meta.config.read_timeout == 7
    assert a.meta.config.retries["mode"] == "standard"
    assert a.meta.config.retries["total_max_attempts"] == 3  # botocore counts the first try too
    assert a.meta.endpoint_url == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k2")  # other credentials: a client of their own
    b = storage.client()
    assert b is not a
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")  # another endpoint: a client of its own
    e = storage.client()
    assert e is not b and e.meta.endpoint_url == "http://127.0.0.1:2"
    monkeypatch.setenv("OAL_S3_TIMEOUT", "8")
    assert storage.client() is not b and storage.client().meta.config.connect_timeout == 8
    monkeypatch.delenv("OAL_S3_TIMEOUT")
    monkeypatch.delenv("OAL_S3_ATTEMPTS")
    c = storage.client()
    assert c.meta.config.connect_timeout == 60 and c.meta.config.retries["total_max_attempts"] == 6
    assert len(storage._clients) == 5


def test_size_sha256_and_move_aside_on_local_paths(tmp_path):
    f = tmp_path / "ckpt.pt"
    assert storage.size(f) is None and storage.size(tmp_path) is None  # absent; a folder has no size
    f.write_bytes(b"x" * 1000)
    assert storage.size(f) == 1000 and storage.size(str(f)) == 1000
    assert storage.sha256(f) == hashlib.sha256(b"x" * 1000).hexdigest()
    big = tmp_path / "big.bin"
    data = bytes(range(256)) * 8200  # over one 1 MiB block
    big.write_bytes(data)
    assert storage.sha256(big) == hashlib.sha256(data).hexdigest()
    first = storage.move_aside(f, "corrupt")
    assert first == tmp_path / "ckpt.pt.corrupt-0" and first.read_bytes() == b"x" * 1000 and not f.exists()
    f.write_bytes(b"again")
    second = storage.move_aside(str(f), "corrupt")  # the next free number: nothing is overwritten
    assert second == tmp_path / "ckpt.pt.corrupt-1" and second.read_bytes() == b"again"
    assert first.read_bytes() == b"x" * 1000
    f.write_bytes(b"third")
    assert storage.move_aside(f, "corrupt") == tmp_path / "ckpt.pt.corrupt-2"
    f.write_bytes(b"fourth")
    assert storage.move_aside(f, "replaced") == tmp_path / "ckpt.pt.replaced-0"


def test_size_sha256_and_move_aside_in_the_store(s3, cache):
    uri = "s3://bkt/run/ckpt.pt"
    path = storage.mirror(uri)
    assert storage.size(uri) is None
    storage.write_text("twelve bytes", path)
    assert storage.size(uri) == 12 and storage.size(path) == 12
    path.write_text("a mirror copy edited by hand")  # the store is asked, not the mirror
    assert storage.size(path) == 12
    assert storage.sha256(uri) == hashlib.sha256(b"twelve bytes").hexdigest()  # fetched first
    s3.put("bkt", "run/ckpt.pt.corrupt-0", b"older")  # taken: the next number is used
    moved = storage.move_aside(uri, "corrupt")
    assert moved == storage.mirror("s3://bkt/run/ckpt.pt.corrupt-1")
    assert s3.objects[("bkt", "run/ckpt.pt.corrupt-1")][0] == b"twelve bytes"
    assert ("bkt", "run/ckpt.pt") not in s3.objects and s3.objects[("bkt", "run/ckpt.pt.corrupt-0")][0] == b"older"
    assert not path.exists() and not storage._version_file(path).exists()
    # an object this node never fetched (no mirror file, no version mark) is moved aside in the store alone
    s3.put("bkt", "run/other.pt", b"remote only")
    moved = storage.move_aside("s3://bkt/run/other.pt", "corrupt")
    assert moved.name == "other.pt.corrupt-0" and s3.objects[("bkt", "run/other.pt.corrupt-0")][0] == b"remote only"
    assert ("bkt", "run/other.pt") not in s3.objects
