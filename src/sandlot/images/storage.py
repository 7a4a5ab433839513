"""The image store's owner: the storage uid range (``idmap.STORAGE_ID_BASE``), never host root.

Image layers are hostile input: an OCI layer can hold setuid-root binaries, file capabilities and
device nodes. Unpacked by root, they become exactly that on the host (a 0666 device node is a
door to the host's memory or disks). So unpacking runs as the storage range instead: ``umoci``
as root of a user namespace whose ids 0..65535 are the storage range on the host. There,
``mknod`` of a device fails (umoci then leaves an empty file: it knows it runs in a user
namespace), files land owned by storage uids, and the kernel records file capabilities as "v3"
ones that count only inside namespaces whose root is the storage uid. Sandboxes see images only
through id-mapped mounts (storage range -> their own range), so a setuid-root file of an image
is setuid-root inside every sandbox and means nothing on the host.

The unpacking process can reach nothing of the store: it is given its staging directory as its
working directory and relative paths, and every directory above it is host root's, mode 0700.

The built-in images are built as host root (mmdebstrap needs it) and then given to the storage
range by :func:`shift_to_storage`.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from pathlib import Path

from sandlot.engines.local import idmap

STORAGE_ID_BASE = idmap.STORAGE_ID_BASE

_CAPS_XATTR = "security.capability"
_VFS_CAP_REVISION_MASK = 0xFF000000
_VFS_CAP_V1, _VFS_CAP_V2, _VFS_CAP_V3 = 0x01000000, 0x02000000, 0x03000000
_OVERFLOW_ID = 65534


def give_to_storage(path: Path) -> None:
    """Make ``path`` (a staging directory) the storage range's own, mode 0700."""
    os.chown(path, STORAGE_ID_BASE, STORAGE_ID_BASE)
    path.chmod(0o700)


def run_as_storage(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``args`` as root of a user namespace mapped onto the storage range, in ``cwd``
    (which :func:`give_to_storage` prepared), with none of the server's environment (which may
    hold a database password) and none of its open files."""
    ns = idmap.userns_fd(STORAGE_ID_BASE)
    try:
        return subprocess.run(
            ["nsenter", f"--user=/proc/self/fd/{ns}", "--", *args],
            cwd=cwd,
            env={"PATH": os.environ.get("PATH") or os.defpath, "LC_ALL": "C.UTF-8"},
            pass_fds=(ns,),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        os.close(ns)


def make_readable(tree: Path) -> None:
    """Let the storage range read ``tree`` (an OCI layout root wrote; a umask may hide it)."""
    for dirpath, _, filenames in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def shift_to_storage(rootfs: Path) -> None:
    """Give a tree built by host root to the storage range: each id ``n`` becomes
    ``STORAGE_ID_BASE + n``; setuid/setgid bits (which chown clears) are set again; file
    capabilities (which chown removes) are written again as v3 capabilities of the storage
    root; device nodes are removed (a sandbox's /dev is its own)."""
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in (*dirnames, *filenames):
            _shift(os.path.join(dirpath, name))
    _shift(str(rootfs))


def _shift(path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        os.unlink(path)
        return
    caps: bytes | None = None
    if stat.S_ISREG(st.st_mode):
        try:
            caps = os.getxattr(path, _CAPS_XATTR, follow_symlinks=False)
        except OSError:
            caps = None
    os.chown(path, _shifted(st.st_uid), _shifted(st.st_gid), follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    if caps:
        v3 = storage_capability(caps)
        if v3 is not None:
            os.setxattr(path, _CAPS_XATTR, v3, follow_symlinks=False)


def _shifted(n: int) -> int:
    return STORAGE_ID_BASE + (n if n < idmap.ID_RANGE else _OVERFLOW_ID)


def storage_capability(value: bytes) -> bytes | None:
    """A ``security.capability`` value, rewritten as a v3 one whose root is the storage root
    (None: not a capability value, or one for a root outside the storage range)."""
    if len(value) < 4:
        return None
    magic = struct.unpack_from("<I", value)[0]
    revision, flags = magic & _VFS_CAP_REVISION_MASK, magic & ~_VFS_CAP_REVISION_MASK
    rootid = 0
    if revision == _VFS_CAP_V1 and len(value) == 12:
        permitted, inheritable = struct.unpack_from("<II", value, 4)
        words = (permitted, inheritable, 0, 0)
    elif revision in (_VFS_CAP_V2, _VFS_CAP_V3) and len(value) in (20, 24):
        words = struct.unpack_from("<IIII", value, 4)
        if revision == _VFS_CAP_V3 and len(value) == 24:
            rootid = struct.unpack_from("<I", value, 20)[0]
    else:
        return None
    if rootid >= idmap.ID_RANGE:
        return None
    return struct.pack("<IIIIII", _VFS_CAP_V3 | flags, *words, STORAGE_ID_BASE + rootid)
