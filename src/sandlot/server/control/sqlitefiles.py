"""SQLite's files on this host: 0600 whatever they were, WAL mode, and a disk reserve so that a
full disk does not stop the server from answering. (PostgreSQL needs none of it.)"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

from sandlot.paths import state_dir
from sandlot.server.control.serverkey import KEY_FILE_NAME


class DatabaseFull(Exception):
    """The database's disk is full: nothing could be written (the server answers 507)."""


class DiskReserve:
    """Room kept for the database on its own disk: a preallocated file beside it.

    Why: sandboxes' disks are sparse and other programs share the state filesystem, so it can
    fill up under the server; SQLite then fails every write ("database or disk is full") and
    every request that records anything failed with a 500. When a write fails for want of space
    the reserve is deleted -- its blocks are the database's to grow into, so the server keeps
    answering (creates are refused by admission meanwhile) -- and it is made again once the disk
    has room, so the next time finds it in place.
    """

    SIZE = 16 * 1024 * 1024
    #: Seconds between checks for room to make the reserve again.
    RECHECK = 2.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._checked = 0.0
        self.arm()

    def arm(self) -> bool:
        """Make the reserve if it is missing; False if the disk has no room for it."""
        if self.path.exists():
            return True
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.SIZE)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        return True

    def release(self) -> bool:
        """Give the reserve's space back to the disk; False if it was already gone."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True

    def rearm_if_room(self) -> None:
        """Make the reserve again once there is room for it and some (checked now and then)."""
        now = time.monotonic()
        if now - self._checked < self.RECHECK or self.path.exists():
            return
        self._checked = now
        vfs = os.statvfs(self.path.parent)
        if vfs.f_bavail * vfs.f_frsize > 4 * self.SIZE:
            self.arm()


def is_disk_full(exc: BaseException | None) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or (
        isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)
    )


def default_database_url(state: Path) -> str:
    return f"sqlite:///{state / 'sandlot.db'}"


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[1] if "///" in url else ""
    path = path.split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def default_key_file(url: str) -> Path:
    """Beside a SQLite database (so a copied state directory keeps working); else in the
    state directory. Replicas on PostgreSQL should name a shared file instead."""
    db = sqlite_path(url)
    return (db.parent if db is not None else state_dir()) / KEY_FILE_NAME


def secure_sqlite_files(db: Path) -> None:
    """The database, its WAL and shared-memory files: 0600, created so (SQLite gives the WAL
    and -shm files the main file's mode) and tightened if an older sandlot left them 0644."""
    db.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(db, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-journal")):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(path, 0o600)


def sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers (the gateway's lookups) never wait for a writer (a create).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    # Deleted rows (a registry secret, a token) are zeroed, not left in free pages.
    cur.execute("PRAGMA secure_delete=ON")
    cur.close()
