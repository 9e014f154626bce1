"""Whole outputs: what ``prepare``, ``convert`` and ``augment`` write appears whole or not at all.

``whole_output(target)`` hands out an empty staging folder; the command writes everything there and,
when it ends without an error, the staging folder takes the target's place:

- locally the staging folder is a hidden sibling of the target (same file system), renamed into place;
  with ``overwrite`` the old output is first renamed aside and removed after the new one is in place,
  so the target is never a mix of an older and a newer run;
- on an object store (``s3://``) the files are staged on local disk and uploaded once complete (the
  ``last`` names after every other file, so a reader that waits for e.g. ``data.yaml`` sees a whole
  set); ``overwrite`` removes the older objects under the prefix first;
- an error (or Ctrl+C) removes the staging folder and leaves the previous output untouched.

An existing target that is not empty is refused (``OutputExistsError``, one line naming it) unless
``overwrite``. ``check_free`` is that test alone, for a command to fail before it reads its inputs.
``resumable`` keeps the staging folder under a fixed name (``.<name>.partial``) across failed runs, so
that a long run (``augment``) resumes from what it had written.

Not here: single files (``storage.atomic_writer`` already writes each one whole).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from detforge import storage
from detforge.errors import DetforgeError

OVERWRITE_HINT = "give --overwrite to replace it whole, or another --out"


class OutputExistsError(DetforgeError):
    """An output folder (or file) that already holds something, and ``--overwrite`` was not given."""


def _local_entries(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(name for name in os.listdir(path))
    return [os.path.basename(path)] if os.path.lexists(path) else []


def _remote_fs(target: str):
    import fsspec

    return fsspec.core.url_to_fs(target)


def _remote_entries(target: str) -> list[str]:
    fs, key = _remote_fs(target)
    found = fs.find(key) if fs.exists(key) else []
    return sorted(
        name[len(key) + 1 :] if name.startswith(key + "/") else storage.basename(name) for name in found
    )


def _remove_prefix(target: str) -> None:
    fs, key = _remote_fs(target)
    for name in fs.find(key):
        fs.rm_file(name)


def existing_entries(target: str | os.PathLike) -> list[str]:
    """What already lies at ``target`` (names in the folder, or the file's own name); [] when free."""
    target = os.fspath(target)
    return _remote_entries(target) if storage.is_remote(target) else _local_entries(target)


def check_free(target: str | os.PathLike, *, overwrite: bool = False, what: str = "output folder") -> None:
    """Raise OutputExistsError when ``target`` already holds something and ``overwrite`` is not set."""
    target = os.fspath(target)
    if overwrite:
        return
    found = existing_entries(target)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise OutputExistsError(f"the {what} is not empty (holds {shown})", path=target, hint=OVERWRITE_HINT)


@contextlib.contextmanager
def whole_output(
    target: str | os.PathLike,
    *,
    overwrite: bool = False,
    what: str = "output folder",
    last: tuple[str, ...] = (),
    resumable: bool = False,
) -> Iterator[str]:
    """An empty local staging folder that becomes ``target`` (a folder or s3:// prefix) when the block ends
    without an error; see the module docstring."""
    target = os.fspath(target).rstrip("/") or "."
    check_free(target, overwrite=overwrite, what=what)
    if storage.is_remote(target):
        with _remote(target, overwrite=overwrite, last=last) as staging:
            yield staging
        return
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    if resumable:
        staging = os.path.join(parent, f".{name}.partial")
        os.makedirs(staging, exist_ok=True)
    else:
        staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    try:
        yield staging
    except BaseException:
        if not resumable:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, target)


def _move_into_place(staging: str, target: str) -> None:
    parent, name = os.path.split(target)
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=parent)
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if old is not None:
            os.rename(old, target)  # put the previous output back
        raise
    _fsync_folder(parent)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(old)


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _remote(target: str, *, overwrite: bool, last: tuple[str, ...]) -> Iterator[str]:
    staging = tempfile.mkdtemp(prefix="detforge-output-")
    try:
        yield staging
        files = sorted(
            os.path.relpath(os.path.join(root, f), staging)
            for root, _, names in os.walk(staging)
            for f in names
        )
        files.sort(key=lambda rel: os.path.basename(rel) in last)  # stable: the `last` names at the end
        if overwrite:
            _remove_prefix(target)
        for rel in files:
            storage.copy_file(os.path.join(staging, rel), storage.join(target, *rel.split(os.sep)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
