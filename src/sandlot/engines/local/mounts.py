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


def mount_overlay(lowers: list[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount the sandbox's overlay (``lowers``: top first). Its layers are named as
    ``/proc/self/fd/N`` of directories we hold open: the options are shown as given in the
    sandbox's ``/proc/self/mountinfo``, and the host paths of its state directory are none of
    its business."""
    fds = [os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for d in (*lowers, upper, work)]
    try:
        lowerdir = ":".join(f"/proc/self/fd/{fd}" for fd in fds[:-2])
        options = f"lowerdir={lowerdir},upperdir=/proc/self/fd/{fds[-2]},"
        options += f"workdir=/proc/self/fd/{fds[-1]}"
        if _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, options.encode()) != 0:
            err = ctypes.get_errno()
            raise MountError(f"cannot mount the sandbox overlay: {os.strerror(err)}")
    finally:
        for fd in fds:
            os.close(fd)


_MS_BIND = 0x1000


def bind_fd(fd: int, target: Path) -> None:
    """Bind the file open as ``fd`` (an ``O_PATH`` fd is enough) at ``target`` (made if absent,
    an empty file): the inode itself, whatever its path becomes afterwards. Unlike a hard link
    it may cross filesystems."""
    target.touch(mode=0o600, exist_ok=True)
    if _libc.mount(f"/proc/self/fd/{fd}".encode(), str(target).encode(), None, _MS_BIND, None):
        err = ctypes.get_errno()
        raise MountError(f"cannot bind a sandbox's file: {os.strerror(err)}")


_SYS_OPEN_TREE = 428
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC


def open_detached(directory: Path, name: str, flags: int, mode: int = 0o600) -> int:
    """Open ``directory/name`` through a detached copy of its mount, so that the path the
    kernel shows for the open file (``readlink /proc/PID/fd/N``, seen by the sandbox for its
    pid 1's stdout) starts at that mount's root instead of naming host directories."""
    tree = _libc.syscall(
        _SYS_OPEN_TREE, -100, str(directory).encode(), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC
    )
    if tree < 0:
        raise MountError(f"open_tree failed: {os.strerror(ctypes.get_errno())}")
    try:
        return os.open(name, flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=tree)
    finally:
        os.close(tree)


class _LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * 64),
        ("lo_crypt_name", ctypes.c_uint8 * 64),
        ("lo_encrypt_key", ctypes.c_uint8 * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class _LoopConfig(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_EBUSY = 16


def mount_existing_disk_image(image: Path, target: Path, *, readonly: bool = False) -> None:
    """Attach ``image`` to a free loop device (autoclear: it goes with the last unmount) and
    mount its ext4 at ``target``. Done with ioctls and mount(2) directly: mount(8) and
    losetup(8) as processes cost ~9 ms of every create."""
    backing = os.open(image, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        for _attempt in range(8):
            control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                number = _libc.ioctl(control, _LOOP_CTL_GET_FREE)
            finally:
                os.close(control)
            if number < 0:
                raise MountError(f"no free loop device: {os.strerror(ctypes.get_errno())}")
            device = f"/dev/loop{number}"
            loop = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                config = _LoopConfig(fd=backing)
                config.info.lo_flags = _LO_FLAGS_AUTOCLEAR | (
                    _LO_FLAGS_READ_ONLY if readonly else 0
                )
                if _libc.ioctl(loop, _LOOP_CONFIGURE, ctypes.byref(config)) != 0:
                    err = ctypes.get_errno()
                    if err == _EBUSY:
                        continue  # another process took this device between our two calls
                    raise MountError(f"cannot attach a disk image to {device}: {os.strerror(err)}")
                if (
                    _libc.mount(
                        device.encode(),
                        str(target).encode(),
                        b"ext4",
                        _MS_NOSUID | _MS_NODEV | (_MS_RDONLY if readonly else 0),
                        None,
                    )
                    != 0
                ):
                    err = ctypes.get_errno()
                    raise MountError(f"cannot mount a disk image: {os.strerror(err)}")
                return
            finally:
                os.close(loop)  # the mount (or, on failure, autoclear) keeps what it needs
        raise MountError("no free loop device after several attempts")
    finally:
        os.close(backing)


def unmount(target: Path) -> None:
    """Lazily detach ``target`` if it is mounted; nothing if it is not."""
    if _libc.umount2(str(target).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (_EINVAL, _ENOENT):
            raise MountError(f"cannot unmount a sandbox's mount: {os.strerror(err)}")


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
