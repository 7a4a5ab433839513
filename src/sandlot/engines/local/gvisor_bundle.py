"""Where runsc finds a gVisor sandbox's files: a per-sandbox directory outside the state directory.

Why: runsc's gofer opens the bundle's root filesystem and the bind mounts' sources by path, as the
sandbox's own host uid. The state directory stays 0700 (it holds the database and the server
key), so nothing under it can be reached that way. Instead each gVisor sandbox gets::

    /run/sandlot/gvisor/            root, 0711 (checked: root's, writable by root only)
      <sandbox id>/                 root : the sandbox's mapped root, 0710
        config.json                 root, 0600 (runsc reads it as root)
        rootfs/                     a bind mount of the sandbox's merged root (bundle/rootfs)
        own/                        a bind mount of its own files on its disk (own_files.py)

Only the sandbox's group may search the directory; nothing of the state directory is made
searchable by anyone, and the two mounts show only what the sandbox sees anyway. The directory
is made again at every start (``/run`` is lost at reboot) and removed with the sandbox's other
mounts at stop, delete and recover.

``/run/sandlot`` and ``/run/sandlot/gvisor`` are reused across servers: each is checked (a real
directory, root's, writable by nobody else) before anything is made in it, and a directory of
someone else's there is refused rather than used. A stale per-sandbox directory (a crash) is
root's by construction (its parent is root's alone) and is taken down and made afresh.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
from pathlib import Path

from sandlot.engines.base import EngineUnavailableError
from sandlot.engines.local import mounts

RUN_DIR = Path("/run/sandlot")
GVISOR_RUN_DIR = RUN_DIR / "gvisor"

_libc = ctypes.CDLL(None, use_errno=True)
_MS_BIND = 0x1000


class UnsafeRunDir(EngineUnavailableError):
    """The host's run directory is not root's alone: an operator's problem (503), never used."""


_REFUSED = (
    "gvisor sandboxes refuse the host's run directory (/run/sandlot/gvisor or its parent) "
    "unless it is root's and writable by root alone (remove it: sandlot makes it afresh)"
)


def sandbox_run_dir(sandbox_id: str) -> Path:
    return GVISOR_RUN_DIR / sandbox_id


def own_dir(sandbox_id: str) -> Path:
    """Where the sandbox's own files appear for runsc (the config's bind sources name this)."""
    return sandbox_run_dir(sandbox_id) / "own"


def _checked_dir(path: Path, mode: int) -> None:
    """``path`` made (``mode``) if absent; refused unless it is a real directory owned by root
    and writable by root alone. Opened without following a symlink, so what is checked is
    what is there."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise UnsafeRunDir(f"{_REFUSED}: not a directory") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeRunDir(f"{_REFUSED}: owned by uid {st.st_uid}, mode {st.st_mode:o}")
        if stat.S_IMODE(st.st_mode) != mode and path != RUN_DIR:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _bind(source: Path, target: Path) -> None:
    target.mkdir(mode=0o700)
    if _libc.mount(str(source).encode(), str(target).encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise mounts.MountError(f"cannot bind a gvisor sandbox's files: {os.strerror(err)}")


def remove(sandbox_id: str) -> None:
    """Take the sandbox's run directory down (its mounts first); nothing if there is none."""
    try:
        parent = os.lstat(GVISOR_RUN_DIR)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(parent.st_mode) or parent.st_uid != 0:
        return  # not ours (prepare refuses it): nothing of ours is in it, nothing to touch
    directory = sandbox_run_dir(sandbox_id)
    for point in mounts.mounts_under(directory):
        mounts.unmount(point)
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(directory, ignore_errors=True)
    else:
        os.unlink(directory)


def prepare(sandbox_id: str, bundle: Path, own: Path, group: int) -> Path:
    """Make the sandbox's run directory afresh from its state ``bundle`` (config.json and the
    mounted rootfs) and its ``own`` files; return it (runsc's ``--bundle``)."""
    RUN_DIR.mkdir(mode=0o755, exist_ok=True)
    _checked_dir(RUN_DIR, 0o755)
    _checked_dir(GVISOR_RUN_DIR, 0o711)
    remove(sandbox_id)  # a crash's, or the last run's
    directory = sandbox_run_dir(sandbox_id)
    os.mkdir(directory, 0o700)
    try:
        os.chown(directory, 0, group)
        os.chmod(directory, 0o710)
        config = (bundle / "config.json").read_bytes()  # as is: runsc judges it
        fd = os.open(
            directory / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "wb") as f:
            f.write(config)
        _bind(bundle / "rootfs", directory / "rootfs")
        _bind(own, directory / "own")
    except BaseException:
        remove(sandbox_id)
        raise
    return directory
