"""A sandbox's writable layer copied into the image store: the body of a filesystem snapshot.

The source is an overlay upper directory the sandbox wrote, so every entry in it is hostile
input, and the copy is what another sandbox (or the host) later trusts as an image layer. Rules:

- Nothing is followed: every step goes through directory fds with ``O_NOFOLLOW``, a regular file
  is checked (``fstat``) to be the inode that was listed, symlinks are copied as links.
- Owners move from the sandbox's uid range into the storage range (uid ``base + n`` becomes
  ``STORAGE_ID_BASE + n``; anything else becomes the storage range's ``nobody``): never host
  root on disk. setuid/setgid bits are kept (they mean root *of the sandbox that spawns the
  snapshot*, as in every image); file capabilities are kept only as v3 capabilities of a root
  inside the sandbox's range, rewritten for the storage root (v1/v2 ones, which would be host
  capabilities, are dropped).
- Overlay whiteouts (character devices 0:0) and opaque directories (``trusted.overlay.opaque``)
  are kept, so the layer stacks on its image as it did in the sandbox. Every other device node
  and every socket is dropped, and so is every other ``trusted.*`` or ``security.*`` attribute
  (the kernel's, not the tenant's to carry along); ``user.*`` attributes are kept.
- Sparse files stay sparse (only data extents are copied: a 1 TB hole costs nothing), hard links
  inside the layer stay links (a million links to one file are one copy, not a million), and
  the whole copy is measured in allocated blocks before it starts against the free space of
  the store's filesystem.
- Directories deeper than :data:`MAX_DEPTH` refuse the snapshot (each level holds two fds).

:func:`apply_layer` also merges a layer onto a directory that already holds one (flattening a
stack of snapshot layers into one): a whiteout removes what it hides, an opaque directory
replaces what was there, a directory over a non-directory becomes opaque.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sandlot.engines.base import ImageError, InsufficientResources
from sandlot.engines.local import idmap
from sandlot.images.layers import DISK_RESERVE, ENTRY_COST
from sandlot.images.sizes import human
from sandlot.images.storage import STORAGE_ID_BASE, storage_capability

#: The deepest directory nesting a snapshot copies (node_modules trees reach ~40).
MAX_DEPTH = 200
OPAQUE_XATTR = "trusted.overlay.opaque"
_CAPS_XATTR = "security.capability"
_VFS_CAP_V3 = 0x03000000
_REVISION_MASK = 0xFF000000
_OVERFLOW_ID = 65534
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LayerRefused(ImageError):
    """The layer cannot become a snapshot (too deep, unreadable); the message says why."""


@dataclass
class LayerTotals:
    """What a copy holds: allocated bytes, entries, and what was left out (by kind)."""

    bytes: int = 0
    entries: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, kind: str) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1


Shift = Callable[[int], int]


def from_sandbox(base: int) -> Shift:
    """Ids of a sandbox whose root is host uid ``base``, as storage ids."""

    def shift(n: int) -> int:
        inside = n - base if base <= n < base + idmap.ID_RANGE else _OVERFLOW_ID
        return STORAGE_ID_BASE + inside

    return shift


def keep_storage(n: int) -> int:
    """Ids already in the storage range (a stored layer merged onto another)."""
    return n if STORAGE_ID_BASE <= n < STORAGE_ID_BASE + idmap.ID_RANGE else _shift_overflow()


def _shift_overflow() -> int:
    return STORAGE_ID_BASE + _OVERFLOW_ID


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def measure(source: Path) -> LayerTotals:
    """Allocated bytes and entries under ``source`` (hard links counted once)."""
    totals = LayerTotals()
    seen: set[tuple[int, int]] = set()
    fd = os.open(source, _DIR_FLAGS)
    try:
        _measure(fd, totals, seen, 0)
    finally:
        os.close(fd)
    return totals


def _measure(fd: int, totals: LayerTotals, seen: set[tuple[int, int]], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise LayerRefused(f"the sandbox's files nest deeper than {MAX_DEPTH} directories")
    for entry in os.scandir(fd):
        st = entry.stat(follow_symlinks=False)
        totals.entries += 1
        if stat.S_ISDIR(st.st_mode):
            child = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
            try:
                _measure(child, totals, seen, depth + 1)
            finally:
                os.close(child)
        elif (st.st_dev, st.st_ino) not in seen:
            if st.st_nlink > 1:
                seen.add((st.st_dev, st.st_ino))
            totals.bytes += st.st_blocks * 512


def check_room(totals: LayerTotals, target_dir: Path, reserve: float = 0.0) -> None:
    """Refuse before copying when the store's filesystem cannot hold ``totals`` and still keep
    ``reserve`` (a fraction of it, at least :data:`DISK_RESERVE`) free: snapshots are on the
    host's disk, which running sandboxes' own disks need too."""
    usage = shutil.disk_usage(target_dir)
    free = usage.free - max(DISK_RESERVE, int(usage.total * reserve))
    needed = totals.bytes + totals.entries * ENTRY_COST
    if needed > free:
        raise InsufficientResources(
            "disk",
            f"the snapshot needs about {human(needed)} and the server's disk has "
            f"{human(max(free, 0))} free for it",
        )


def apply_layer(source: Path, target: Path, shift: Shift, totals: LayerTotals) -> None:
    """Copy (merge) the layer ``source`` onto the directory ``target`` (made by the caller),
    ids through ``shift``. A full disk raises :class:`InsufficientResources`."""
    src = os.open(source, _DIR_FLAGS)
    try:
        dst = os.open(target, _DIR_FLAGS)
        try:
            _Copier(shift, totals, dst).tree(src, dst, 0)
            _own(dst, os.fstat(src), shift)
        finally:
            os.close(dst)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientResources("disk", "the server's disk is full") from None
        raise LayerRefused(f"the sandbox's files cannot be copied: {exc.strerror}") from None
    finally:
        os.close(src)


def _own(fd: int, st: os.stat_result, shift: Shift) -> None:
    """Owner, then mode (chown clears setuid/setgid: the mode goes on after it), then times
    (make and Python's .pyc checks compare modification times)."""
    os.fchown(fd, shift(st.st_uid), shift(st.st_gid))
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


class _Copier:
    def __init__(self, shift: Shift, totals: LayerTotals, root: int) -> None:
        self.shift = shift
        self.totals = totals
        self.root = root
        #: (dev, ino) of a source file with several links -> its path in the target (bytes).
        self.linked: dict[tuple[int, int], bytes] = {}

    def tree(self, src: int, dst: int, depth: int, path: bytes = b"") -> None:
        if depth > MAX_DEPTH:
            raise LayerRefused(f"the sandbox's files nest deeper than {MAX_DEPTH} directories")
        for entry in os.scandir(src):
            name = os.fsencode(entry.name)
            st = entry.stat(follow_symlinks=False)
            self.totals.entries += 1
            old = _lstat(dst, name)
            if stat.S_ISDIR(st.st_mode):
                self._directory(src, dst, name, st, old, depth, path + b"/" + name)
            elif stat.S_ISREG(st.st_mode):
                _remove(dst, name, old)
                self._file(src, dst, name, st, path + b"/" + name)
            elif stat.S_ISLNK(st.st_mode):
                _remove(dst, name, old)
                os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
                uid, gid = self.shift(st.st_uid), self.shift(st.st_gid)
                os.chown(name, uid, gid, dir_fd=dst, follow_symlinks=False)
                times = (st.st_atime_ns, st.st_mtime_ns)
                os.utime(name, ns=times, dir_fd=dst, follow_symlinks=False)
            elif is_whiteout(st):
                _remove(dst, name, old)
                os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=dst)
                os.chown(name, self.shift(st.st_uid), self.shift(st.st_gid), dir_fd=dst)
            elif stat.S_ISFIFO(st.st_mode):
                _remove(dst, name, old)
                os.mkfifo(name, stat.S_IMODE(st.st_mode) & 0o777, dir_fd=dst)
                os.chown(name, self.shift(st.st_uid), self.shift(st.st_gid), dir_fd=dst)
            else:  # device nodes, sockets: nothing a layer may carry
                self.totals.drop("device" if stat.S_ISCHR(st.st_mode) else "special")

    def _directory(
        self,
        src: int,
        dst: int,
        name: bytes,
        st: os.stat_result,
        old: os.stat_result | None,
        depth: int,
        path: bytes,
    ) -> None:
        child_src = os.open(name, _DIR_FLAGS, dir_fd=src)
        try:
            opaque = _get_xattr(child_src, OPAQUE_XATTR) == b"y"
            if old is not None and (opaque or not stat.S_ISDIR(old.st_mode)):
                _remove(dst, name, old)
                # A directory over what hid the lower layers' one hides them still.
                opaque = True
            if old is None or not stat.S_ISDIR(old.st_mode) or opaque:
                os.mkdir(name, 0o700, dir_fd=dst)
            child_dst = os.open(name, _DIR_FLAGS, dir_fd=dst)
            try:
                if opaque:
                    os.setxattr(child_dst, OPAQUE_XATTR, b"y")
                self.tree(child_src, child_dst, depth + 1, path)
                _copy_user_xattrs(child_src, child_dst)
                _own(child_dst, os.fstat(child_src), self.shift)
            finally:
                os.close(child_dst)
        finally:
            os.close(child_src)

    def _file(self, src: int, dst: int, name: bytes, st: os.stat_result, path: bytes) -> None:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.linked:
            with contextlib.suppress(OSError):  # its first path was replaced since: copy it
                first = self.linked[key].lstrip(b"/")
                os.link(first, name, src_dir_fd=self.root, dst_dir_fd=dst, follow_symlinks=False)
                return
        reading = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd_in = os.open(name, reading, dir_fd=src)
        try:
            now = os.fstat(fd_in)
            if (now.st_dev, now.st_ino) != key or not stat.S_ISREG(now.st_mode):
                raise LayerRefused("the sandbox's files changed while they were copied")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd_out = os.open(name, flags, 0o600, dir_fd=dst)
            try:
                _copy_data(fd_in, fd_out, now.st_size)
                self.totals.bytes += os.fstat(fd_out).st_blocks * 512
                _copy_user_xattrs(fd_in, fd_out)
                _own(fd_out, now, self.shift)
                caps = _get_xattr(fd_in, _CAPS_XATTR)
                if caps is not None:
                    shifted = self._capability(caps)
                    if shifted is None:
                        self.totals.drop("capability")
                    else:
                        os.setxattr(fd_out, _CAPS_XATTR, shifted)
                os.utime(fd_out, ns=(now.st_atime_ns, now.st_mtime_ns))
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)
        if st.st_nlink > 1:
            self.linked[key] = path

    def _capability(self, value: bytes) -> bytes | None:
        """A v3 capability whose root is inside the source's range, for the storage root."""
        if len(value) != 24 or struct.unpack_from("<I", value)[0] & _REVISION_MASK != _VFS_CAP_V3:
            return None
        rootid = struct.unpack_from("<I", value, 20)[0]
        shifted = self.shift(rootid)
        if shifted == _shift_overflow():
            return None
        relative = value[:20] + struct.pack("<I", shifted - STORAGE_ID_BASE)
        return storage_capability(relative)


def _lstat(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(dir_fd: int, name: bytes, old: os.stat_result | None) -> None:
    if old is None:
        return
    if stat.S_ISDIR(old.st_mode):
        shutil.rmtree(os.fsdecode(name), dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _get_xattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


def _copy_user_xattrs(fd_in: int, fd_out: int) -> None:
    with contextlib.suppress(OSError):
        for name in os.listxattr(fd_in):
            if name.startswith("user."):
                os.setxattr(fd_out, name, os.getxattr(fd_in, name))


def _copy_data(fd_in: int, fd_out: int, size: int) -> None:
    """Copy the data extents only (holes stay holes), then set the size."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd_in, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(fd_in, start, os.SEEK_HOLE)
        position = start
        os.lseek(fd_out, position, os.SEEK_SET)
        while position < end:
            # in-kernel copy; copy_file_range refuses to cross filesystems (EXDEV) here
            copied = os.sendfile(fd_out, fd_in, position, min(end - position, 1 << 30))
            if copied == 0:
                break
            position += copied
        offset = end
    os.ftruncate(fd_out, size)
