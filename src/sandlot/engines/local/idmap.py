"""Id-mapped mounts: how a shared image becomes the rootfs of a user-namespaced sandbox.

Root in a sandbox is an unprivileged uid range on the host (``base .. base+65535``). Images in the
store are owned by another unprivileged range, the storage range (:data:`STORAGE_ID_BASE`: an
image's root is that uid on the host, so its setuid files and file capabilities mean nothing
there); a trusted host directory used as an image is owned by host root. For the image's files to
look like they belong to root inside, the image directory is mounted *id-mapped* (owner range ->
the sandbox's range; ``open_tree`` -> ``mount_setattr(MOUNT_ATTR_IDMAP)`` -> ``move_mount``, kernel
>= 5.19) read-only, and used as the overlay's lower layer; the overlay's upper directory is owned
by ``base`` on the host. Nothing is copied or chowned, so creating a sandbox stays cheap and the
image is never written. There is no libc wrapper for these syscalls in Python, hence ctypes.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path

from sandlot.engines.base import EngineError

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442

_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = 0o2000000
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_AT_FDCWD = -100
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4

#: Size of each sandbox's uid/gid range (what a container's root and users map to).
ID_RANGE = 65536
#: First host uid handed to sandboxes; sandbox slot ``n`` gets ``ID_BASE + n * ID_RANGE``.
ID_BASE = 1_000_000
#: The storage range: owner of every image in the image store (its root is this uid on the
#: host, never host root), and the identity its unpacks run as. Just below the sandboxes' ranges,
#: so that no sandbox ever gets it.
STORAGE_ID_BASE = ID_BASE - ID_RANGE


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class IdmapError(EngineError):
    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        #: The kernel's answer, without the paths in the message.
        self.reason = reason or message


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        reason = f"{os.strerror(err)} (errno {err})"
        raise IdmapError(f"{what} failed: {reason}", reason)
    return ret


def userns_fd(base: int, size: int = ID_RANGE, *, first: int = 0) -> int:
    """Return an fd of a user namespace mapping first..first+size-1 to base..base+size-1
    (``first``: the owner range of an id-mapped mount's source, e.g. the storage range).

    A short-lived ``unshare --user`` child holds the namespace until we have its fd; we write its
    maps ourselves (as root), which needs no /etc/subuid entries.
    """
    own = os.readlink("/proc/self/ns/user")
    child = subprocess.Popen(
        ["unshare", "--user", "--", "sleep", "30"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        ns_path = f"/proc/{child.pid}/ns/user"
        while True:
            try:
                if os.readlink(ns_path) != own:
                    break
            except OSError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                raise IdmapError("could not create a user namespace (unshare --user failed)")
            time.sleep(0.0005)
        for kind in ("uid_map", "gid_map"):
            with open(f"/proc/{child.pid}/{kind}", "w") as f:
                f.write(f"{first} {base} {size}\n")
        return os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()


def mount_idmapped(source: Path, target: Path, ns_fd: int, *, readonly: bool = True) -> None:
    """Mount ``source`` at ``target`` with its ids shifted through the user namespace ``ns_fd``."""
    tree = _check(
        _libc.syscall(
            _SYS_OPEN_TREE,
            _AT_FDCWD,
            str(source).encode(),
            _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE,
        ),
        f"open_tree({source})",
    )
    try:
        attr = _MountAttr()
        attr.attr_set = (
            _MOUNT_ATTR_IDMAP | _MOUNT_ATTR_NODEV | (_MOUNT_ATTR_RDONLY if readonly else 0)
        )
        attr.userns_fd = ns_fd
        _check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR,
                tree,
                b"",
                _AT_EMPTY_PATH | _AT_RECURSIVE,
                ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            f"mount_setattr(MOUNT_ATTR_IDMAP) on {source}",
        )
        _check(
            _libc.syscall(
                _SYS_MOVE_MOUNT,
                tree,
                b"",
                _AT_FDCWD,
                str(target).encode(),
                _MOVE_MOUNT_F_EMPTY_PATH,
            ),
            f"move_mount to {target}",
        )
    finally:
        os.close(tree)
