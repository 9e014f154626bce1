"""Reading and writing files on local disk or any fsspec URL (``s3://bucket/key`` above all).

Writes are atomic: locally a temporary file in the same folder is renamed into place; on object
stores the data is staged in a local temporary file and sent in a single PUT only when complete,
so a reader never sees half a file. S3 endpoints and credentials come from the usual AWS settings
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profiles ...), read by botocore. A local write keeps the
mode of the file it replaces (a new file gets the usual mode under the umask) and the folder is fsync-ed
after the rename, so a save that returned survives a power loss. ``local_copy`` caches a remote object
under the hash of its exact URI and fetches it again when its ETag changes. ``mask_credentials`` is what
any URL may show of itself: never a password.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import posixpath
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from detforge.errors import MissingDependencyError, StorageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


MASK = "***"
# scheme://AUTHORITY: the authority ends at the first / ? # or white space (as ffmpeg, curl and urllib read
# it); everything in it before its last "@" is user information.
_AUTHORITY = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/?#\s]*)")
# a key=value pair whose key names a secret: in a query (?pw=, &PIN=, ;token=) or a key=value connection
# string (password='a b'); the value runs to the next & ; # or white space, or is a quoted string
_SECRET_VALUE = re.compile(
    r"(?P<key>(?:^|(?<=[?&;\s]))(?P<name>[A-Za-z0-9_.-]+)\s*=\s*)"
    r"(?P<value>'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^&;#\s]*)"
)
SECRET_KEYS = frozenset(
    {
        "pw",
        "pin",
        "psw",
        "pwd",
        "pass",
        "passwd",
        "password",
        "passcode",
        "loginpas",
        "token",
        "key",
        "secret",
        "auth",
        "sig",
        "signature",
        "credential",
        "session",
    }
)
_SECRET_PARTS = ("pass", "pwd", "token", "secret", "key", "auth", "sig", "credential", "session")


def is_secret_key(name: str) -> bool:
    """Whether a query or connection-string key names a secret (``pw``, ``PIN``, ``loginpas``, ``api_key``,
    ``X-Amz-Signature``, ...; case-insensitive)."""
    name = name.lower()
    return name in SECRET_KEYS or any(part in name for part in _SECRET_PARTS)


def secret_values(text: str) -> list[str]:
    """The values of the secret-looking ``key=value`` pairs in ``text`` (quotes kept), in order."""
    return [m["value"] for m in _SECRET_VALUE.finditer(text) if is_secret_key(m["name"]) and m["value"]]


def mask_credentials(text: str) -> str:
    """``text`` with every URL's user information -- all of the authority before its last ``@``, so
    ``rtsp://admin:p@ss@cam/s`` -> ``rtsp://***@cam/s`` -- and every secret-looking ``key=value`` (``?pw=``,
    ``&PIN=``, ``loginpas=``, ``password='a b'``) replaced by ``***``; other text unchanged.

    Whatever shows a URL (messages, statuses, logs, error text, folder names) goes through this.
    """

    def authority(match: re.Match) -> str:
        head, at, host = match["authority"].rpartition("@")
        return f"{match['scheme']}{MASK}@{host}" if at else match[0]

    def value(match: re.Match) -> str:
        return f"{match['key']}{MASK}" if is_secret_key(match["name"]) and match["value"] else match[0]

    return _SECRET_VALUE.sub(value, _AUTHORITY.sub(authority, text))


def is_remote(uri: str | os.PathLike) -> bool:
    """True for URLs with a protocol other than file:// (s3://, gs://, memory:// ...)."""
    text = os.fspath(uri)
    return "://" in text and not text.startswith("file://")


def _local(uri: str | os.PathLike) -> str:
    text = os.fspath(uri)
    return text[len("file://") :] if text.startswith("file://") else text


def _filesystem(uri: str):
    import fsspec

    protocol = uri.split("://", 1)[0]
    try:
        fs = fsspec.filesystem(protocol)
    except ImportError as exc:
        raise MissingDependencyError(
            f"reading {protocol}:// needs an fsspec backend that is not installed",
            path=uri,
            hint="pip install 'detforge[s3]' for s3://",
        ) from exc
    except ValueError as exc:
        raise StorageError(f"unknown storage protocol '{protocol}'", path=uri) from exc
    return fs


def _strip(uri: str) -> str:
    return uri.split("://", 1)[1]


@contextlib.contextmanager
def _errors(uri: str, action: str) -> Iterator[None]:
    """Turn the many ways storage fails (OS, botocore, fsspec) into one StorageError naming the path."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"cannot {action}: no such file", path=uri) from exc
    except IsADirectoryError as exc:
        raise StorageError(f"cannot {action}: it is a folder", path=uri) from exc
    except PermissionError as exc:
        raise StorageError(
            f"cannot {action}: permission denied",
            path=uri,
            hint="check the credentials or the file's permissions",
        ) from exc
    except OSError as exc:
        raise StorageError(f"cannot {action}: {exc}", path=uri) from exc
    except Exception as exc:  # botocore/aiohttp errors have no common base we can import cheaply
        name = type(exc).__module__.split(".")[0]
        if name in {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec"}:
            raise StorageError(f"cannot {action}: {type(exc).__name__}: {exc}", path=uri) from exc
        raise


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts with '/' for URLs and the OS separator for local paths."""
    base = os.fspath(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def basename(uri: str | os.PathLike) -> str:
    """The last path component of a local path or URL."""
    path = os.fspath(uri)
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def stem(uri: str | os.PathLike) -> str:
    """The file name without its extension: the image id used across detforge."""
    name = basename(uri)
    return name.rsplit(".", 1)[0] if "." in name else name


def exists(uri: str | os.PathLike) -> bool:
    """Whether a file (or folder) exists."""
    uri = os.fspath(uri)
    if not is_remote(uri):
        return os.path.exists(_local(uri))
    with _errors(uri, "check"):
        return _filesystem(uri).exists(_strip(uri))


def makedirs(uri: str | os.PathLike) -> None:
    """Create a local folder and its parents; nothing to do on object stores."""
    uri = os.fspath(uri)
    if not is_remote(uri):
        with _errors(uri, "create the folder"):
            os.makedirs(_local(uri), exist_ok=True)


@contextlib.contextmanager
def open_file(uri: str | os.PathLike, mode: str = "rb") -> Iterator[IO]:
    """Open a file for reading ('r'/'rb'). For writing use atomic_writer."""
    if "w" in mode or "a" in mode:
        raise ValueError("open_file is for reading; use atomic_writer to write")
    uri = os.fspath(uri)
    with _errors(uri, "read"):
        if is_remote(uri):
            handle = _filesystem(uri).open(_strip(uri), "rb")
            if "b" not in mode:
                import io

                handle = io.TextIOWrapper(handle, encoding="utf-8")
        else:
            handle = open(_local(uri), mode, **({} if "b" in mode else {"encoding": "utf-8"}))
        with handle:
            yield handle


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of a file."""
    with open_file(uri, "rb") as handle, _errors(os.fspath(uri), "read"):
        return handle.read()


def read_text(uri: str | os.PathLike) -> str:
    """The whole content of a UTF-8 text file."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StorageError(f"not UTF-8 text (byte {exc.start})", path=os.fspath(uri)) from exc


def iter_lines(uri: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield (line number from 1, raw line without the newline), streaming; blank lines included.

    A UTF-8 byte order mark at the start of the file (Windows tools write one) is dropped, so every reader
    of manifests, predictions and label lists accepts such a file; a BOM anywhere else stays in the line.
    """
    uri = os.fspath(uri)
    with open_file(uri, "rb") as handle, _errors(uri, "read"):
        for number, line in enumerate(handle, start=1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            yield number, line.rstrip(b"\r\n")


@contextlib.contextmanager
def atomic_writer(uri: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write a file so that it appears whole or not at all.

    Locally: a temporary file beside the target (with the target's mode, or for a new file 0666 under
    the umask, as ``open`` gives), flushed and fsynced, renamed over it, then the folder fsynced.
    Remote: a local temporary file, uploaded in one PUT after the block ends without error.
    """
    uri = os.fspath(uri)
    binary = "b" in mode
    remote = is_remote(uri)
    if remote:
        fd, tmp = tempfile.mkstemp(prefix=".detforge-", suffix=".part")
    else:
        target = Path(_local(uri))
        with _errors(uri, "create the folder"):
            target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_beside(target)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if remote:
            with _errors(uri, "write"):
                _filesystem(uri).put_file(tmp, _strip(uri))
        else:
            with _errors(uri, "write"):
                os.replace(tmp, target)
            fsync_dir(str(target.parent))  # the rename itself survives a power loss
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _create_beside(target: Path) -> tuple[int, str]:
    """A new hidden temporary file in ``target``'s folder, with the mode ``target`` has (or, for a new file,
    what ``open`` would give it: 0666 under the umask, applied by the kernel)."""
    try:
        keep = os.stat(target).st_mode & 0o7777
    except OSError:
        keep = None
    for _ in range(100):
        tmp = str(target.parent / f".detforge-{secrets.token_hex(6)}.part")
        try:
            with _errors(str(target), "write"):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        if keep is not None and hasattr(os, "fchmod"):  # (not on Windows before Python 3.13)
            os.fchmod(fd, keep)
        return fd, tmp
    raise StorageError("cannot create a temporary file", path=str(target))


def fsync_dir(directory: str) -> None:
    """Make a rename or unlink in ``directory`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FileLock:
    """One owner for a local file or folder: an exclusive ``flock`` on ``path`` (which says ``pid N``),
    held until ``release()`` or the process ends (also when it is killed: the kernel drops it). Where
    ``fcntl`` does not exist (not POSIX) there is no lock and ``acquire`` always succeeds.
    """

    def __init__(self, path: str | os.PathLike, *, remove: bool = True) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.remove = remove  # delete the file on release (else it stays, saying who held it last)
        self._handle: IO | None = None

    def acquire(self) -> str | None:
        """Take the lock: None when taken, else who holds it (``pid 1234``, as the holder wrote it)."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            return None
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            handle = open(self.path, "a+")  # noqa: SIM115 - held open while the lock is held
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                return holder
            try:  # the holder before us may have removed the file between our open and our flock
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        try:
            handle.write(f"pid {os.getpid()}")
            handle.flush()
        except OSError:  # a full disk: the lock holds all the same, only its note is missing
            pass
        self._handle = handle
        return None

    def release(self) -> None:
        """Let go (removing the file first when ``remove``, so no one reads a stale pid)."""
        if self._handle is None:
            return
        if self.remove:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        self._handle.close()
        self._handle = None


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_writer(uri, "wb") as handle:
        handle.write(data)


def write_text(uri: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    write_bytes(uri, text.encode("utf-8"))


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy one file between any two locations (atomic at the target)."""
    source, target = os.fspath(source), os.fspath(target)
    with open_file(source, "rb") as src, atomic_writer(target, "wb") as dst, _errors(source, "copy"):
        shutil.copyfileobj(src, dst, 1 << 20)


def remove(uri: str | os.PathLike) -> None:
    """Delete one file (local or remote); a missing one is no error."""
    uri = os.fspath(uri)
    with _errors(uri, "delete"):
        if is_remote(uri):
            fs = _filesystem(uri)
            if fs.exists(_strip(uri)):
                fs.rm_file(_strip(uri))
        elif os.path.lexists(_local(uri)):
            os.remove(_local(uri))


def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move one file: a rename locally, a server-side copy then delete within one object store (the target
    appears whole), else ``copy_file`` then ``remove``."""
    source, target = os.fspath(source), os.fspath(target)
    if not is_remote(source) and not is_remote(target):
        with _errors(target, "move"):
            os.replace(_local(source), _local(target))
        return
    if is_remote(source) and source.split("://", 1)[0] == target.split("://", 1)[0]:
        with _errors(target, "move"):
            _filesystem(source).copy(_strip(source), _strip(target))
    else:
        copy_file(source, target)
    remove(source)


def list_files(
    uri: str | os.PathLike, *, suffixes: tuple[str, ...] | None = None, recursive: bool = True
) -> list[str]:
    """Files under a folder or prefix, sorted; filtered by lower-case suffix when given."""
    uri = os.fspath(uri)

    def keep(name: str) -> bool:
        return suffixes is None or name.lower().endswith(suffixes)

    if not is_remote(uri):
        root = Path(_local(uri))
        if not root.is_dir():
            raise StorageError("not a folder", path=uri)
        paths = root.rglob("*") if recursive else root.glob("*")
        return sorted(str(p) for p in paths if p.is_file() and keep(p.name) and not p.name.startswith("."))
    protocol = uri.split("://", 1)[0]
    fs = _filesystem(uri)
    with _errors(uri, "list"):
        if recursive:
            found = fs.find(_strip(uri))
        else:
            found = [entry["name"] for entry in fs.ls(_strip(uri), detail=True) if entry["type"] == "file"]
    return sorted(f"{protocol}://{name}" for name in found if keep(name))


def cache_path(uri: str, cache_dir: str | os.PathLike) -> str:
    """Where ``local_copy`` keeps a remote object: ``cache_dir/<scheme>/<hash>/<file name>``, where the
    hash is of the exact URI up to its file name, unnormalized: ``a/../b/x``, ``b/x``, ``a//b/x`` and
    ``a/./b/x`` are distinct objects in a store and get distinct copies. The files of one folder share a
    folder (a deploy folder's ``model.json`` and ``model.onnx`` stay side by side)."""
    root = os.path.abspath(os.fspath(cache_dir))
    scheme, _, rest = uri.partition("://")
    folder, _, name = rest.rpartition("/")
    digest = hashlib.sha256(f"{scheme}://{folder}".encode()).hexdigest()[:40]
    if name in ("", ".", "..") or "\x00" in name or os.sep in name:
        name = "object"
    safe_scheme = re.sub(r"[^A-Za-z0-9+.-]", "_", scheme) or "remote"
    return os.path.join(root, safe_scheme, digest, name)


# cached copies already checked against their remote object by this process (one HEAD per object per run)
_CHECKED: set[str] = set()
# beside a cached copy: the ETag (or size and time) of the remote object it was made from
TAG_SUFFIX = ".detforge-tag"


def local_copy(uri: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """A local path for a file: itself when local, else a cached download under cache_dir.

    A cached copy is used only while the remote object is unchanged: the first time a process asks for
    an object, its ETag (or size and modification time, where a store has no ETag) is compared with the
    one the copy was made from, and a changed object is downloaded again. When the store cannot be
    reached, an existing copy is used (a cache works offline); without one, the error names the object.
    """
    uri = os.fspath(uri)
    if not is_remote(uri):
        return _local(uri)
    cached = cache_path(uri, cache_dir)
    if cached in _CHECKED and os.path.exists(cached):
        return cached
    try:
        tag = _remote_tag(uri)
    except FileNotFoundError as exc:  # gone from the store: a cached copy must not stand in for it
        raise StorageError("cannot read: no such file", path=uri) from exc
    except Exception:  # the store cannot be reached (offline, no route, throttled): the copy still serves
        if os.path.exists(cached):
            return cached
        tag = None  # copy_file says why it cannot read the object
    tag_file = cached + TAG_SUFFIX
    if tag is None or not os.path.exists(cached) or _read_tag(tag_file) != tag:
        copy_file(uri, cached)
        if tag is not None:
            with atomic_writer(tag_file, "w") as handle:
                handle.write(tag)
    _CHECKED.add(cached)
    return cached


def _remote_tag(uri: str) -> str:
    """What identifies the remote object's content: its ETag, else size and modification time."""
    fs = _filesystem(uri)
    path = _strip(uri)
    fs.invalidate_cache(path)
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag {str(etag).strip(chr(34))}"
    return f"size {info.get('size')} mtime {info.get('LastModified') or info.get('mtime')}"


def _read_tag(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return None


def resolve_allowed_path(path: object, allowed: tuple[str, ...] | list[str]) -> str:
    """The real path of ``path`` if it is a file inside one of the ``allowed`` folders, else StorageError.

    Symlinks and ``..`` are resolved first (``realpath``), so ``ALLOWED/../etc/passwd`` or a link that
    points outside is refused. A relative path is taken relative to the first allowed folder.
    """
    if not allowed:
        raise StorageError("reading files named in requests is off", hint="start with --allow-path DIR")
    if not isinstance(path, str) or not path:
        raise StorageError(f"the file path must be a non-empty string, got {path!r}")
    if "\x00" in path:
        raise StorageError("the file path contains a NUL byte")
    if is_remote(path):
        raise StorageError("only local files can be named here", path=path)
    candidate = path if os.path.isabs(path) else os.path.join(allowed[0], path)
    real = os.path.realpath(candidate)
    for folder in allowed:
        root = os.path.realpath(folder)
        if os.path.commonpath([real, root]) == root:
            if not os.path.isfile(real):
                raise StorageError("no such file", path=path)
            return real
    raise StorageError("not inside an allowed folder (--allow-path), refused", path=path)
