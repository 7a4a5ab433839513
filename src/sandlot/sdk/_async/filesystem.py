"""AsyncFilesystem: ``sandbox.filesystem``, files and directories inside a sandbox.

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shlex
import stat
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, BinaryIO

import httpx

from sandlot.sdk._async.calls import UPLOAD_CHUNK, check_limit
from sandlot.sdk._async.processes import ProcessesMixin
from sandlot.sdk._primitives import async_run_blocking
from sandlot.sdk.errors import SandboxFileTooLargeError, SandboxRequestError
from sandlot.sdk.types import FileContent


class AsyncFilesystem:
    """``sandbox.filesystem``: files and directories inside the sandbox (binary-safe)."""

    def __init__(self, sandbox: ProcessesMixin) -> None:
        self._sandbox = sandbox

    async def _call(self, route: str, what: str, body: dict[str, Any]) -> Any:
        data = await self._sandbox._agent("POST", route, what, json_body=body)
        if isinstance(data, dict) and data.get("error"):
            raise SandboxRequestError(f"{what}: {data['error']}", 400, data)
        return data

    async def mkdir(self, path: str, recursive: bool = False) -> None:
        await self._call("/make_dir", f"mkdir {path}", {"path": path, "recursive": recursive})

    async def list_dir(self, path: str = ".") -> list[str]:
        data = await self._call("/list_dir", f"list {path}", {"path": path})
        return [str(e) for e in data.get("entries", [])]

    async def delete_dir(self, path: str) -> None:
        await self._call("/delete_dir", f"delete directory {path}", {"path": path})

    async def write_file(self, path: str, content: str | bytes | BinaryIO) -> None:
        """Create or replace a file with ``content`` (text is written as UTF-8, bytes as they
        are). The write is atomic; parent directories must exist.

        ``content`` may also be a file opened for binary reading (sandlot): it is sent from
        where it stands to its end in pieces, never held in memory whole."""
        what = f"write {path}"
        if isinstance(content, str):
            data = content.encode("utf-8")
        elif isinstance(content, (bytes, bytearray, memoryview)):
            data = bytes(content)
        elif callable(getattr(content, "read", None)):
            await self._sandbox._agent_raw(
                "PUT",
                "/files",
                what,
                params={"path": path},
                content=_reader_pieces(content),
                length=await async_run_blocking(_remaining_length, content),
            )
            return
        else:
            raise SandboxRequestError(
                f"content must be str, bytes or a binary file, not {type(content).__name__}", 400
            )
        await self._sandbox._agent_raw("PUT", "/files", what, params={"path": path}, content=data)

    async def write_files(
        self, files: Iterable[Mapping[str, Any]] | Mapping[str, str | bytes]
    ) -> None:
        """Write several files: ``[{"path": ..., "content": ...}, ...]`` or ``{path: content}``."""
        items: list[tuple[str, Any]]
        if isinstance(files, Mapping):
            items = [(str(p), c) for p, c in files.items()]
        else:
            items = [(str(f["path"]), f["content"]) for f in files]
        for path, content in items:
            await self.write_file(path, content)

    async def read_file(
        self, path: str, encoding: str = "utf-8", max_bytes: int | None = None
    ) -> FileContent:
        """``{content, encoding}``: text for ``encoding="utf-8"`` (the default; bytes that are
        not UTF-8 become U+FFFD), base64 text for ``encoding="base64"``. ``.bytes`` gives the
        exact bytes either way -- or use :meth:`read_bytes`, whose ``max_bytes`` this takes."""
        if encoding not in ("utf-8", "base64"):
            raise SandboxRequestError("encoding must be 'utf-8' or 'base64'", 400)
        raw = await self.read_bytes(path, max_bytes=max_bytes)
        if encoding == "base64":
            return FileContent(base64.b64encode(raw).decode("ascii"), "base64")
        return FileContent(raw.decode("utf-8", "replace"), "utf-8")

    async def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        """A file's exact bytes, at most ``max_bytes`` of them (sandlot; default the handle's
        ``max_read_bytes``, 64 MiB): a larger file, or an endless one such as a symlink to
        ``/proc/self/pagemap``, raises :class:`SandboxFileTooLargeError` once the limit is
        passed, having held no more than that. :meth:`download_file` copies big files to
        disk instead."""
        limit = self._sandbox.max_read_bytes if max_bytes is None else max_bytes
        check_limit(limit, "max_bytes")
        pieces: list[bytes] = []
        async with self._sandbox._agent_download(path, f"read {path}") as response:
            _check_announced(response, limit, path)
            total = 0
            async for piece in response.aiter_bytes():
                total += len(piece)
                if total > limit:
                    raise _too_large(path, limit)
                pieces.append(piece)
        return b"".join(pieces)

    async def rename_file(self, old_path: str, new_path: str) -> None:
        """Rename (``mv``) a file or directory."""
        result = await self._sandbox.exec(f"mv -- {shlex.quote(old_path)} {shlex.quote(new_path)}")
        if result.exit_code != 0:
            raise SandboxRequestError(
                f"rename {old_path} -> {new_path}: {result.stderr.strip()}", 400, result.stderr
            )

    async def rm(self, path: str, recursive: bool = False) -> None:
        """Remove a file, or a directory tree with ``recursive=True``."""
        info = await self.stat(path)
        if not info.get("exists"):
            raise SandboxRequestError(f"rm {path}: No such file or directory", 404, info)
        if info.get("type") == "directory":
            if not recursive:
                raise SandboxRequestError(
                    f"rm {path}: is a directory (pass recursive=True)", 400, info
                )
            await self.delete_dir(path)
        else:
            await self._call("/delete_file", f"rm {path}", {"path": path})

    async def stat(self, path: str) -> dict[str, Any]:
        """``{exists, type, size, mode, mtime, uid, gid}`` of a path (symlinks followed)."""
        data = await self._call("/stat", f"stat {path}", {"path": path})
        return dict(data)

    async def exists(self, path: str) -> bool:
        return bool((await self.stat(path)).get("exists"))

    async def is_file(self, path: str) -> bool:
        return (await self.stat(path)).get("type") == "file"

    async def is_dir(self, path: str) -> bool:
        return (await self.stat(path)).get("type") == "directory"

    async def upload_file(self, local_path: str | os.PathLike[str], remote_path: str) -> None:
        """Copy a local file into the sandbox (binary-safe, streamed: the file is never held
        in memory whole)."""
        path = os.fspath(local_path)
        with open(path, "rb") as f:
            await self._sandbox._agent_raw(
                "PUT",
                "/files",
                f"upload {path} to {remote_path}",
                params={"path": remote_path},
                content=_reader_pieces(f),
                length=await async_run_blocking(_remaining_length, f),
            )

    async def download_file(
        self,
        local_path: str | os.PathLike[str],
        remote_path: str,
        max_bytes: int | None = None,
    ) -> None:
        """Copy a sandbox file to ``local_path`` (binary-safe). Note the seed's order:
        local path first.

        The bytes stream to disk, in constant memory, through a temporary file beside
        ``local_path`` that replaces it once complete (a failed copy leaves nothing behind).
        ``max_bytes`` (sandlot) stops the copy past that size with
        :class:`SandboxFileTooLargeError`. Without it a regular file, whose size the agent
        announces and the sandbox's disk bounds, is copied whole, and a file of unknown length
        (procfs, sysfs: perhaps endless) stops at the handle's ``max_read_bytes``."""
        if max_bytes is not None:
            check_limit(max_bytes, "max_bytes")
        local = os.fspath(local_path)
        what = f"download {remote_path}"
        async with self._sandbox._agent_download(remote_path, what) as response:
            limit = max_bytes
            if limit is None and "content-length" not in response.headers:
                limit = self._sandbox.max_read_bytes
            if limit is not None:
                _check_announced(response, limit, remote_path)
            sink = await async_run_blocking(_LocalFile, local)
            try:
                total = 0
                async for piece in response.aiter_bytes(DOWNLOAD_CHUNK):
                    total += len(piece)
                    if limit is not None and total > limit:
                        raise _too_large(remote_path, limit)
                    await async_run_blocking(sink.write, piece)
                await async_run_blocking(sink.commit)
            finally:
                sink.discard()  # not in a thread: a cancelled task must still clean up


#: Downloads are written to disk in pieces of this size (one thread hop each in the async SDK).
DOWNLOAD_CHUNK = 1 << 20


def _too_large(path: str, limit: int) -> SandboxFileTooLargeError:
    return SandboxFileTooLargeError(
        f"read {path}: the file is larger than max_bytes={limit}; pass a larger max_bytes, "
        "or download_file() to copy it to disk",
        limit,
    )


def _check_announced(response: httpx.Response, limit: int, path: str) -> None:
    """Refuse before reading a byte when the agent announces more than ``limit``."""
    try:
        announced = int(response.headers.get("content-length", ""))
    except ValueError:
        return
    if announced > limit:
        raise _too_large(path, limit)


async def _reader_pieces(f: BinaryIO) -> AsyncIterator[bytes]:
    while True:
        piece = await async_run_blocking(f.read, UPLOAD_CHUNK)
        if not piece:
            return
        yield piece


def _remaining_length(f: BinaryIO) -> int | None:
    """Bytes from ``f``'s position to its end when it is a regular file (the upload then has
    a Content-Length); None for a pipe or a socket (sent chunked)."""
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(0, st.st_size - f.tell())
    except (OSError, ValueError, AttributeError):  # io.BytesIO has no fileno()
        pass
    try:
        here = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(here)
        return max(0, end - here)
    except (OSError, ValueError, AttributeError):
        return None


class _LocalFile:
    """Where a download lands: a temporary file beside the target, renamed over it when
    complete; a target that exists and is not a regular file (``/dev/null``, a FIFO) is
    written to directly."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            direct = not stat.S_ISREG(os.stat(path).st_mode)
        except FileNotFoundError:
            direct = False
        if direct:
            self._tmp: str | None = None
            self._f = open(path, "wb")  # noqa: SIM115 - closed by commit() or discard()
            return
        directory, name = os.path.split(os.path.abspath(path))
        self._tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.part")
        # 0666 less the umask, as open(path, "wb") would give the file itself
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        self._f = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self._f.write(data)

    def commit(self) -> None:
        self._f.close()
        if self._tmp is not None:
            os.replace(self._tmp, self.path)
            self._tmp = None

    def discard(self) -> None:
        """Drop what was written, unless :meth:`commit` ran (then nothing is left to do)."""
        self._f.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None
