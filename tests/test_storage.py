"""Storage: local and S3 (moto) read/write/list/exists, atomic writes, clear errors."""

from __future__ import annotations

import pytest

from detforge import storage
from detforge.errors import StorageError


def test_local_atomic_write_list_exists(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    storage.write_text(target, "hello\nworld\n")
    assert storage.read_text(target) == "hello\nworld\n"
    assert list(storage.iter_lines(target)) == [(1, b"hello"), (2, b"world")]
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
    from detforge.storage import cache_path

    cache = tmp_path / "cache"
    assert cache_path("s3://bucket/frames/a.jpg", cache) == str(cache / "s3" / "bucket" / "frames" / "a.jpg")
    # a key with ".." segments must not write outside the cache (e.g. over ~/.bashrc)
    escaped = cache_path("s3://bucket/../../../../home/user/.bashrc", cache)
    assert escaped.startswith(str(cache / "_by-hash") + "/") and escaped.endswith("-.bashrc")
    assert cache_path("s3://bucket/../../x.jpg", cache) != cache_path("s3://bucket/../../y/x.jpg", cache)


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
