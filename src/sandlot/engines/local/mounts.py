"""Mount helpers (libc through ctypes: a ``mount`` subprocess per call would cost milliseconds)."""

from __future__ import annotations

import ctypes
import os
import subprocess
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


def mount_existing_disk_image(image: Path, target: Path) -> None:
    # mount(8) sets up the loop device with autoclear: it goes away with the last unmount.
    mounted = subprocess.run(
        ["mount", "-t", "ext4", "-o", "loop,nodev,nosuid", str(image), str(target)],
        capture_output=True, text=True,
    )
    if mounted.returncode != 0:
        raise MountError(f"cannot mount the sandbox's disk: {mounted.stderr.strip()}")


def unmount(target: Path) -> None:
    """Lazily detach ``target`` if it is mounted; nothing if it is not."""
    if _libc.umount2(str(target).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (_EINVAL, _ENOENT):
            raise MountError(f"cannot unmount {target}: {os.strerror(err)}")


def is_mountpoint(path: Path) -> bool:
    return os.path.ismount(path)


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


def loop_devices_of(image: Path) -> list[str]:
    """Loop devices still backed by ``image`` (also when the file is already deleted)."""
    found = []
    target = str(image)
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().strip()
        except OSError:
            continue
        if name == target or name == f"{target} (deleted)":
            found.append(backing.parent.parent.name)
    return found


def wait_loop_released(image: Path, timeout: float = 2.0) -> None:
    """After the lazy unmount of a disk image, its loop device goes once the last user of the
    filesystem (a dying sandbox's mount namespace) lets go; wait for that, then detach it
    ourselves if it lingers (its autoclear flag would do so later anyway)."""
    import time

    deadline = time.monotonic() + timeout
    delay = 0.001
    while loop_devices_of(image):
        if time.monotonic() > deadline:
            for device in loop_devices_of(image):
                subprocess.run(["losetup", "-d", f"/dev/{device}"], capture_output=True)
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
