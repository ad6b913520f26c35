"""One path layer for everything a run reads and writes: local folders and object-store URLs.

Workdirs, `init_from` and data folders may be local paths or URLs such as
`gs://bucket/run` (a TPU VM loses its disk on preemption; a bucket outlives
it). `os.path` would silently turn `gs://b/x` into a local folder `gs:/b/x`,
so every path goes through here. Orbax (through `etils.epath`, for
checkpoints) picks TensorFlow's gfile when TensorFlow is installed; maejax's
own files always go through fsspec (gcsfs for gs://), which also offers
the one operation a lease needs, an exclusive create.

Local files are replaced atomically (write a temporary file, then
`os.replace`). Object stores have no rename-over and no append, but an object
becomes visible only once its upload completes, so writing the whole object
in one request is the equivalent: readers see the old or the new content,
never a torn one. Append-only files (metrics.jsonl, TensorBoard events) are
appended to locally and rewritten whole on a store (`AppendFile`).
"""

import contextlib
import importlib.util
import io
import os
import posixpath
import uuid

from maejax.errors import UserError

# The fsspec package each URL scheme needs (what etils.epath serves).
BACKEND_PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}


def scheme(path: str) -> str | None:
    """'gs' for 'gs://b/x', None for a local path."""
    path = os.fspath(path)
    return path.split("://", 1)[0] if "://" in path else None


def is_url(path) -> bool:
    return scheme(os.fspath(path)) is not None


def join(base: str, *parts: str) -> str:
    """Join path parts; URLs keep their scheme and use '/'."""
    base = os.fspath(base)
    if is_url(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def absolute(path: str) -> str:
    """An absolute local path, or the URL unchanged (abspath would make it local)."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def check_backend(path: str, what: str = "path") -> None:
    """Fail in one line when `path` is a URL whose scheme has no installed backend.

    Raised before anything compiles; the message names the package to install.
    """
    name = scheme(os.fspath(path))
    if name is None:
        return
    package = BACKEND_PACKAGES.get(name)
    if package is None:
        raise UserError(
            f"{what} {path!r}: the URL scheme {name}:// is not supported; "
            f"use a local folder or one of {', '.join(s + '://' for s in BACKEND_PACKAGES)}"
        )
    if importlib.util.find_spec(package) is None:
        raise UserError(
            f"{what} {path!r} needs the package {package} to reach {name}:// "
            f"(pip install {package}; `pip install 'maejax[tpu]'` includes gcsfs)"
        )


def _store(path: str):
    """(fsspec filesystem, path) for a URL, listing afresh every time.

    gcsfs caches folder listings per process by default; another process's
    new lease or checkpoint would then look absent (or a deleted one present).
    """
    import fsspec.config
    import fsspec.core

    for protocol in ("gs", "gcs", "s3", "az", "abfs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
    return fsspec.core.url_to_fs(path)


def _ask(path, store_method: str, local_function):
    """A yes/no question about `path`, put to its store or to the local filesystem."""
    path = os.fspath(path)
    if is_url(path):
        fs, key = _store(path)
        return getattr(fs, store_method)(key)
    return local_function(path)


def exists(path) -> bool:
    return _ask(path, "exists", os.path.exists)


def isdir(path) -> bool:
    return _ask(path, "isdir", os.path.isdir)


def isfile(path) -> bool:
    return _ask(path, "isfile", os.path.isfile)


def makedirs(path) -> None:
    """Create a local folder; a store has no folders (an object's name implies them)."""
    path = os.fspath(path)
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
    path = os.fspath(path)
    if is_url(path):
        fs, key = _store(path)
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(key, detail=False))
    return sorted(os.listdir(path))


def read_bytes(path) -> bytes:
    path = os.fspath(path)
    if is_url(path):
        fs, key = _store(path)
        try:
            return fs.cat_file(key)
        except FileNotFoundError:
            raise FileNotFoundError(path) from None
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode()


def remove(path) -> None:
    """Delete a file; a missing one is fine."""
    path = os.fspath(path)
    with contextlib.suppress(FileNotFoundError):
        if is_url(path):
            fs, key = _store(path)
            fs.rm_file(key)
        else:
            os.remove(path)


def write_atomic(path, data: str | bytes) -> None:
    """Replace `path` with `data` so that a reader or a kill never sees a torn file.

    Locally: a temporary file in the same folder, then os.replace. On a store:
    one object upload, which becomes visible only once complete.
    """
    path = os.fspath(path)
    data = data.encode() if isinstance(data, str) else data
    if is_url(path):
        fs, key = _store(path)
        fs.pipe_file(key, data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def create_exclusive(path, text: str) -> bool:
    """Write `path` only if it does not exist yet; False if it does.

    Locally O_EXCL; on a store, fsspec's 'xb' mode (a create-only,
    generation-match precondition on GCS), so two runs racing for a lease
    cannot both win.
    """
    path = os.fspath(path)
    if not is_url(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    fs, key = _store(path)
    try:
        with fs.open(key, "xb") as f:
            f.write(text.encode())
    except FileExistsError:
        return False
    return True


def move(source, target) -> None:
    """Move a file or folder (on a store: copy, then delete the source)."""
    source, target = os.fspath(source), os.fspath(target)
    if is_url(source) != is_url(target):
        raise ValueError(f"cannot move between a store and local disk: {source} -> {target}")
    if is_url(source):
        fs, key = _store(source)
        fs.mv(key, _store(target)[1], recursive=True)
    else:
        os.replace(source, target)


def copy_to_local(url: str, folder: str) -> int:
    """Copy every object under the store folder `url` into the local `folder`; how many."""
    fs, key = _store(url)
    count = 0
    for name in fs.find(key):
        relative = posixpath.relpath(name, key)
        target = os.path.join(folder, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(name, target)
        count += 1
    return count


class AppendFile:
    """A file that only grows (metrics rows, TensorBoard records): `write` + `flush`.

    Locally an ordinary file opened for appending. Object stores cannot
    append, so there the content is kept in memory and the whole object is
    rewritten on each flush (the files are small: scalars and a few images).
    """

    def __init__(self, path, binary: bool = False):
        self.path = os.fspath(path)
        self._binary = binary
        self.closed = False
        self._remote = is_url(self.path)
        if self._remote:
            self._buffer = io.BytesIO()
            if exists(self.path):
                self._buffer.write(read_bytes(self.path))
            self._dirty = True
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "ab" if binary else "a")  # noqa: SIM115 (closed in close())

    def write(self, data) -> None:
        if not self._remote:
            self._file.write(data)
            return
        self._buffer.write(data if isinstance(data, bytes) else data.encode())
        self._dirty = True

    def flush(self) -> None:
        if not self._remote:
            self._file.flush()
        elif self._dirty:
            write_atomic(self.path, self._buffer.getvalue())
            self._dirty = False

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        if not self._remote:
            self._file.close()
        self.closed = True
