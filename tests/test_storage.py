"""Storage: local and S3 (moto) read/write/list/exists, atomic writes, clear errors."""

from __future__ import annotations

import os
import stat

import pytest

from detforge import storage
from detforge.errors import StorageError


def test_local_atomic_write_list_exists(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    storage.write_text(target, "hello\nworld\n")
    assert storage.read_text(target) == "hello\nworld\n"
    assert list(storage.iter_lines(target)) == [(1, b"hello"), (2, b"world")]
    storage.write_bytes(target, b"\xef\xbb\xbfhello\r\n\xef\xbb\xbfworld")  # only the first BOM goes
    assert list(storage.iter_lines(target)) == [(1, b"hello"), (2, b"\xef\xbb\xbfworld")]
    storage.write_text(target, "hello\nworld\n")
    assert storage.exists(target) and not storage.exists(tmp_path / "nope")
    with pytest.raises(RuntimeError), storage.atomic_writer(target, "wb") as handle:
        handle.write(b"partial")
        raise RuntimeError("writer failed")
    assert target.read_text() == "hello\nworld\n"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.txt"]
    assert storage.list_files(tmp_path, suffixes=(".txt",)) == [str(target)]
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(tmp_path / "missing.txt")


def test_s3_round_trip_and_errors(make_bucket):
    bucket = make_bucket()
    uri = f"s3://{bucket}/dir/x.manifest"
    storage.write_bytes(uri, b'{"a": 1}\n')
    assert storage.read_bytes(uri) == b'{"a": 1}\n'
    assert storage.exists(uri) and not storage.exists(f"s3://{bucket}/dir/y.manifest")
    assert storage.list_files(f"s3://{bucket}/dir") == [uri]
    with pytest.raises(RuntimeError), storage.atomic_writer(f"s3://{bucket}/dir/z.txt") as handle:
        handle.write(b"half")
        raise RuntimeError("writer failed")
    assert not storage.exists(f"s3://{bucket}/dir/z.txt")
    with pytest.raises(StorageError, match=rf"s3://{bucket}/missing.manifest: cannot read"):
        storage.read_bytes(f"s3://{bucket}/missing.manifest")


def test_cache_path_stays_inside_the_cache_folder(tmp_path):
    import hashlib

    from detforge.storage import cache_path

    cache = tmp_path / "cache"
    digest = hashlib.sha256(b"s3://bucket/frames").hexdigest()[:40]
    assert cache_path("s3://bucket/frames/a.jpg", cache) == str(cache / "s3" / digest / "a.jpg")
    # a key with ".." segments must not write outside the cache (e.g. over ~/.bashrc)
    escaped = cache_path("s3://bucket/../../../../home/user/.bashrc", cache)
    assert escaped.startswith(str(cache / "s3") + "/") and escaped.endswith("/.bashrc")
    assert os.path.dirname(os.path.dirname(escaped)) == str(cache / "s3")
    for key in ("s3://bucket/a/..", "s3://bucket/a/.", "s3://bucket/a/"):
        assert os.path.basename(cache_path(key, cache)) == "object"
    # every spelling of a key is its own object in S3, so it is its own copy (never the exact URI's neighbour)
    keys = ["victim/model.onnx", "attacker/../victim/model.onnx", "a/b/x", "a//b/x", "a/./b/x", "a/b//x"]
    assert len({cache_path(f"s3://bucket/{key}", cache) for key in keys}) == len(keys)
    # a deploy folder's two files stay side by side
    assert os.path.dirname(cache_path("s3://b/d/model.json", cache)) == os.path.dirname(
        cache_path("s3://b/d/model.onnx", cache)
    )


def test_distinct_keys_that_normalize_alike_never_share_a_cached_copy(make_bucket, tmp_path):
    """Against moto's S3: keys that one path normalization would fold together are distinct objects;
    each gets its own bytes from the cache, in either order."""
    bucket = make_bucket()
    keys = {
        "victim/model.onnx": b"victim",
        "attacker/../victim/model.onnx": b"attacker",
        "a/b/x": b"plain",
        "a//b/x": b"double slash",
        "a/./b/x": b"dot",
    }
    import boto3

    client = boto3.client("s3")
    for key, data in keys.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    assert sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]) == sorted(keys)
    cache = tmp_path / "cache"
    for order in (list(keys), list(reversed(keys))):
        storage._CHECKED.clear()
        for key in order:
            local = storage.local_copy(f"s3://{bucket}/{key}", cache)
            assert open(local, "rb").read() == keys[key], key


def test_atomic_writes_keep_the_mode_and_fsync_the_folder(tmp_path, monkeypatch):
    target = tmp_path / "secret.txt"
    old = os.umask(0o077)
    try:
        storage.write_text(target, "one")  # a new file: the umask decides, as for open()
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    finally:
        os.umask(old)
    os.umask(0o022)
    try:
        storage.write_text(target, "two")  # a 0600 file stays 0600 whatever the umask
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
        os.chmod(target, 0o640)
        storage.write_bytes(target, b"three")
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o640 and target.read_bytes() == b"three"
        storage.write_text(tmp_path / "public.txt", "x")
        assert stat.S_IMODE(os.stat(tmp_path / "public.txt").st_mode) == 0o644
    finally:
        os.umask(old)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1]
    )
    storage.write_text(target, "four")
    # the temporary file's data, then the folder that holds the rename
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / ".detforge-"))
    assert synced[1] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["public.txt", "secret.txt"]


def test_local_copy_fetches_a_changed_object_again_and_works_offline(make_bucket, tmp_path, monkeypatch):
    bucket = make_bucket()
    uri = f"s3://{bucket}/frames/a.jpg"
    cache = tmp_path / "cache"
    storage.write_bytes(uri, b"first")
    path = storage.local_copy(uri, cache)
    assert open(path, "rb").read() == b"first" and path.startswith(str(cache))
    storage.write_bytes(uri, b"second version")  # the bucket's object changes between two runs
    monkeypatch.setattr(storage, "_CHECKED", set())  # a new process
    assert open(storage.local_copy(uri, cache), "rb").read() == b"second version"
    # within one process the object is checked once, not on every read (a training epoch reads it again)
    calls = []
    real = storage._remote_tag
    monkeypatch.setattr(storage, "_remote_tag", lambda u: calls.append(u) or real(u))
    for _ in range(3):
        storage.local_copy(uri, cache)
    assert calls == []
    # the store cannot be reached: the cached copy serves (the cache works offline)
    monkeypatch.setattr(storage, "_CHECKED", set())

    def unreachable(u):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(storage, "_remote_tag", unreachable)
    assert open(storage.local_copy(uri, cache), "rb").read() == b"second version"
    monkeypatch.setattr(storage, "_remote_tag", real)
    # an object deleted from the store is not served from the cache
    monkeypatch.setattr(storage, "_CHECKED", set())
    import fsspec

    fsspec.filesystem("s3").rm(uri)
    with pytest.raises(StorageError, match=rf"{uri}: cannot read: no such file"):
        storage.local_copy(uri, cache)
