"""Mount helpers (libc through ctypes: a ``mount`` subprocess per call would cost milliseconds)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from sandlot.engines.base import EngineError

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2
_EINVAL = 22
_ENOENT = 2


class MountError(EngineError):
    pass


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise MountError(f"cannot mount the sandbox overlay on {target}: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Lazily detach ``target`` if it is mounted; nothing if it is not."""
    if _libc.umount2(str(target).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (_EINVAL, _ENOENT):
            raise MountError(f"cannot unmount {target}: {os.strerror(err)}")


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points at or below ``prefix``, deepest first (the order to unmount them in)."""
    found = []
    root = str(prefix).rstrip("/")
    with open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                found.append(Path(point))
    return sorted(set(found), key=lambda p: -len(p.parts))
