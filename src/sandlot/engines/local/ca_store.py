"""The operator's extra CA certificates (:mod:`sandlot.ca_certs`) placed in a new sandbox.

What ``update-ca-certificates`` would do, without running any tool on the image's files: the
image's own bundle (``/etc/ssl/certs/ca-certificates.crt``) with the extra certificates
appended, and the extra certificates alone in ``/usr/local/share/ca-certificates``. Both are
written into the sandbox's fresh overlay layer (``upper/``) before the overlay is mounted and
before any of its processes exist: they are ordinary files of the sandbox (root inside owns
them, on its disk, kept across sleep and in snapshots), so no mount point lies in a path the
sandbox controls, and nothing the sandbox does later reaches the host.

The image is read, never followed: every directory on the way must be a real directory of the
image and the bundle a regular file (a registry image whose ``/etc/ssl`` is a symlink, say to
the host's ``/etc``, gets no combined bundle); the bundle read is bounded. Images without the
Debian layout get the extra file and ``NODE_EXTRA_CA_CERTS`` only. Cost per create, only with
extra CAs configured: reading the image's bundle and writing it with the extra CAs (~220 KiB),
1.7 ms (median of 50 on this busy 2-core host; no cache, so a host-path image's changes count).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sandlot.ca_certs import EXTRA_FILE, SYSTEM_BUNDLE, ExtraCA, sandbox_env

#: The largest image bundle combined (Debian's is ~220 KiB).
MAX_IMAGE_BUNDLE = 4 * 1024 * 1024


class CAStore:
    """Puts one set of extra CAs into sandboxes."""

    def __init__(self, extra: ExtraCA) -> None:
        self.extra = extra

    def install(self, image_rootfs: Path, upper: Path, owner: int) -> dict[str, str]:
        """Write the files into ``upper`` (empty, not yet mounted) as ``owner`` (the sandbox's
        root); return the environment variables the sandbox's commands get."""
        bundle = _combined(image_rootfs, self.extra.pem)
        has_extra = _place(image_rootfs, upper, EXTRA_FILE, self.extra.pem, owner)
        has_bundle = bundle is not None and _place(
            image_rootfs, upper, SYSTEM_BUNDLE, bundle, owner
        )
        return sandbox_env(has_bundle, has_extra)


def _image_lstat(image_rootfs: Path, relative: str) -> os.stat_result | None:
    try:
        return os.lstat(image_rootfs / relative)
    except FileNotFoundError:
        return None


def _real_dirs(image_rootfs: Path, parts: list[str]) -> bool:
    """Each of the leading directories of ``parts`` is a directory of the image, or absent;
    never a symlink or another kind of file. Checked from the top down, so no link is followed."""
    for i in range(1, len(parts)):
        st = _image_lstat(image_rootfs, "/".join(parts[:i]))
        if st is not None and not stat.S_ISDIR(st.st_mode):
            return False
    return True


def _combined(image_rootfs: Path, extra: bytes) -> bytes | None:
    """The image's bundle plus ``extra``; None if the image has no such regular file."""
    parts = SYSTEM_BUNDLE.strip("/").split("/")
    if not _real_dirs(image_rootfs, parts):
        return None
    st = _image_lstat(image_rootfs, "/".join(parts))
    if st is None or not stat.S_ISREG(st.st_mode):
        return None
    fd = os.open(image_rootfs / "/".join(parts), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        own = f.read(MAX_IMAGE_BUNDLE + 1)
    if len(own) > MAX_IMAGE_BUNDLE:
        return None
    return own.rstrip(b"\n") + b"\n" + extra


def _place(image_rootfs: Path, upper: Path, path: str, content: bytes, owner: int) -> bool:
    """Write ``content`` at ``path`` in the sandbox's layer; its directories are made with the
    image's modes (0755 where the image has none). False if the image's layout is not plain."""
    parts = path.strip("/").split("/")
    if not _real_dirs(image_rootfs, parts):
        return False
    current = upper
    for i, part in enumerate(parts[:-1]):
        current = current / part
        if not current.is_dir():
            st = _image_lstat(image_rootfs, "/".join(parts[: i + 1]))
            mode = stat.S_IMODE(st.st_mode) if st is not None else 0o755
            os.mkdir(current, mode)
            os.chown(current, owner, owner, follow_symlinks=False)
            os.chmod(current, mode)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(current / parts[-1], flags, 0o644)
    try:
        os.fchown(fd, owner, owner)
        os.fchmod(fd, 0o644)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return True
