"""File operations: Koyeb's JSON routes plus sandlot's binary-safe extensions.

Writes are atomic: the bytes go to a temporary file in the target's directory, are fsync'ed,
and the temporary file is renamed over the target, so a reader (or a crash) never sees half a
file. Errors map to HTTP statuses with the message the OS gave (Koyeb's SDK classifies on
"No such file", "File exists", "not empty").
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable

from sandlot.agent.http11 import HTTPError

# Annotations only: importing typing at run time costs the agent milliseconds of start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755

_ERRNO_STATUS = {
    errno.ENOENT: 404,
    errno.ENOTDIR: 400,
    errno.EISDIR: 400,
    errno.EEXIST: 409,
    errno.ENOTEMPTY: 409,
    errno.EACCES: 403,
    errno.EPERM: 403,
    errno.EROFS: 403,
    errno.ENAMETOOLONG: 400,
    errno.ELOOP: 400,
    errno.EINVAL: 400,
    errno.ENOSPC: 507,
    errno.EDQUOT: 507,
    errno.EBUSY: 409,
}


def os_error(exc: OSError, path: str, **extra: Any) -> HTTPError:
    """An HTTP error carrying the OS's own wording, e.g. "No such file or directory: /x"."""
    status = _ERRNO_STATUS.get(exc.errno or 0, 500)
    reason = exc.strerror or str(exc)
    return HTTPError(status, f"{reason}: {path}", **extra)


def check_path(value: Any, field: str = "path") -> str:
    if not isinstance(value, str) or not value:
        raise HTTPError(400, f"'{field}' is required and must be a non-empty string")
    if "\x00" in value:
        raise HTTPError(400, f"'{field}' must not contain NUL characters")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        raise HTTPError(400, f"'{field}' is not a valid file name (lone surrogate)") from None
    return value


def _resolve_target(path: str) -> str:
    """Write through a symlink to what it points at, as ``open(path, "w")`` would."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return os.path.realpath(path)
    except OSError:
        pass
    return path


def _missing_parent(exc: OSError, path: str, directory: str) -> HTTPError:
    """A write into a directory that does not exist fails, as with Koyeb's executor (404, "No
    such file or directory", which Koyeb's SDK classifies on), and says which directory is
    missing: the first one, from the root down."""
    missing = directory
    for ancestor in reversed([directory, *_ancestors(directory)]):
        if not os.path.lexists(ancestor):
            missing = ancestor
            break
    return os_error(
        exc,
        f"{path} (the directory {missing} does not exist: create it first with make_dir, "
        "which is mkdir -p, or write with create_parents)",
        success=False,
    )


def _ancestors(directory: str) -> list[str]:
    out = []
    while (parent := os.path.dirname(directory)) != directory:
        out.append(parent)
        directory = parent
    return out


def atomic_write(
    path: str,
    chunks: Iterable[bytes],
    *,
    mode: int | None = None,
    create_parents: bool = False,
) -> int:
    """Write ``chunks`` to ``path`` atomically; returns the number of bytes written.

    The new file keeps the mode (and, when we may, the owner) of the file it replaces;
    otherwise it gets ``mode`` or 0644.
    """
    target = _resolve_target(path)
    directory = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise os_error(IsADirectoryError(errno.EISDIR, "Is a directory"), path)
    if create_parents:
        os.makedirs(directory, DEFAULT_DIR_MODE, exist_ok=True)
    existing: os.stat_result | None
    try:
        existing = os.stat(target)
    except OSError:
        existing = None
    base = os.path.basename(target)
    tmp = os.path.join(directory, f".{base}.sandlot-{os.urandom(6).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileNotFoundError as exc:
        raise _missing_parent(exc, path, directory) from None
    written = 0
    try:
        for data in chunks:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                written += n
        os.fsync(fd)
        if existing is not None and mode is None:
            os.fchmod(fd, stat.S_IMODE(existing.st_mode))
            if os.geteuid() == 0:
                with contextlib.suppress(OSError):
                    os.fchown(fd, existing.st_uid, existing.st_gid)
        else:
            os.fchmod(fd, DEFAULT_FILE_MODE if mode is None else mode)
        os.close(fd)
        fd = -1
        os.rename(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return written


def open_for_read(path: str) -> tuple[int, int]:
    """Open a file to read; returns ``(fd, size)``.

    Directories, FIFOs and sockets are refused (a FIFO would block the handler forever);
    ``O_NONBLOCK`` keeps even the ``open`` of a FIFO from blocking.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise os_error(exc, path) from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise HTTPError(400, f"Is a directory: {path}")
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        os.close(fd)
        raise HTTPError(400, f"Not a regular file: {path}")
    os.set_blocking(fd, True)
    return fd, st.st_size


def read_all(fd: int, limit: int, path: str) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        data = os.read(fd, 1 << 20)
        if not data:
            return b"".join(parts)
        total += len(data)
        if total > limit:
            raise HTTPError(
                413,
                f"file larger than {limit} bytes; use GET /files?path= to download it: {path}",
            )
        parts.append(data)


def make_dir(path: str) -> None:
    try:
        os.makedirs(path, DEFAULT_DIR_MODE, exist_ok=True)
    except FileExistsError:
        raise HTTPError(409, f"File exists: {path}") from None
    except OSError as exc:
        raise os_error(exc, path) from None


def delete_file(path: str) -> None:
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            raise HTTPError(400, f"Is a directory: {path}")
        os.unlink(path)
    except OSError as exc:
        raise os_error(exc, path) from None


def delete_dir(path: str) -> None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise os_error(exc, path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise HTTPError(400, f"Not a directory: {path}")
    import shutil  # not at module level: it imports compression modules we rarely need

    errors: list[str] = []

    def onerror(_func: Any, p: str, exc_info: Any) -> None:
        errors.append(f"{exc_info[1].strerror or exc_info[1]}: {p}")

    shutil.rmtree(path, onerror=onerror)
    if errors:
        raise HTTPError(500 if not os.path.exists(path) else 409, "; ".join(errors[:5]))


_TYPES = (
    (stat.S_ISREG, "file"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "char_device"),
    (stat.S_ISBLK, "block_device"),
)


def file_type(mode: int) -> str:
    for test, name in _TYPES:
        if test(mode):
            return name
    return "other"


def describe(st: os.stat_result) -> dict[str, Any]:
    return {
        "type": file_type(st.st_mode),
        "size": st.st_size,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "mtime": st.st_mtime,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def list_dir(path: str, details: bool) -> dict[str, Any]:
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise os_error(exc, path) from None
    out: dict[str, Any] = {"entries": [e.name for e in entries]}
    if details:
        rows = []
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished between listing and stat
            row = {"name": e.name, **describe(st)}
            if row["type"] == "symlink":
                with contextlib.suppress(OSError):
                    row["target"] = os.readlink(e.path)
            rows.append(row)
        out["details"] = rows
    return out


def stat_path(path: str, follow_symlinks: bool) -> dict[str, Any]:
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return {"path": path, "exists": False}
    except OSError as exc:
        raise os_error(exc, path) from None
    out = {"path": path, "exists": True, **describe(st)}
    if out["type"] == "symlink":
        with contextlib.suppress(OSError):
            out["target"] = os.readlink(path)
    return out
