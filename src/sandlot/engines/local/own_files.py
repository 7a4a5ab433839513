"""The files the platform gives each sandbox, kept on the sandbox's own disk.

Why on its disk: ``/etc/hostname``, ``/etc/hosts``, ``/etc/resolv.conf``, ``/.sandlot/run`` and
the agent's log (pid 1's stdout, which root inside can reopen through ``/proc/1/fd/1``) are
writable by the sandbox. As files of the host's state directory, 2,600 MiB written through them
by a micro sandbox with a 2 GiB quota landed on the host. Kept in ``sandlot/`` beside the
overlay's ``upper/`` on the sandbox's ext4 image, every byte counts against its quota, and the
bind sources the sandbox sees in its mountinfo are paths of that image, not of the host.

Layout on the disk (``layer/``)::

    upper/ work/          the overlay's writable layer
    sandlot/              host root, 0755 (never visible as such in the sandbox)
      etc/                hostname, hosts, resolv.conf: owned by the sandbox's root, bound rw
      run/                owned by the sandbox's root, bound rw at /.sandlot/run
      config/             host root : sandbox root, 0750, bound ro at /.sandlot/config:
                          ``secret``, ``env`` and ``main`` (the main process's command;
                          0440): the sandbox reads them, and cannot
                          change them even after remounting (their owner is unmapped inside)
      agent.log[.1]       pid 1's stdout and stderr, rotated at each start past LOG_MAX_BYTES
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from sandlot.engines.local import mounts
from sandlot.engines.local.oci_spec import ETC_FILES

OWN_DIR = "sandlot"
#: The agent's log is rotated at start when it is bigger than this; one old file is kept.
LOG_MAX_BYTES = 1024 * 1024
#: Directories of the sandbox's root that must be real directories when it starts: ``/proc``
#: and ``/sys`` (the closure's loader looks for its preload list and libraries under ``/sys``,
#: see ``sandlot.runtime.closure``) and the mount points of the platform's own directories. A
#: symlink there, left by the sandbox's last run, would send a mount (and the agent's lookups)
#: somewhere the sandbox can write.
MOUNT_POINTS = (
    "proc",
    "sys",
    ".sandlot",
    ".sandlot/runtime",
    ".sandlot/run",
    ".sandlot/config",
)


def own_dir(layer: Path) -> Path:
    return layer / OWN_DIR


def _write(path: Path, content: str, uid: int, gid: int, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.write(fd, content.encode())
    finally:
        os.close(fd)


def prepare(
    layer: Path,
    base: int,
    *,
    etc: Mapping[str, str],
    secret: str | None,
    env: Mapping[str, str],
    main_command: str | None = None,
) -> Path:
    """Make the sandbox's own files on its freshly mounted disk; return their directory."""
    own = own_dir(layer)
    own.mkdir(mode=0o755)
    (own / "etc").mkdir(mode=0o755)
    for name in ETC_FILES:
        _write(own / "etc" / name, etc[name], base, base, 0o644)
    (own / "run").mkdir(mode=0o700)
    os.chown(own / "run", base, base)
    config = own / "config"
    config.mkdir(mode=0o750)
    os.chown(config, 0, base)
    config.chmod(0o750)
    _write(config / "env", json.dumps(dict(env)), 0, base, 0o440)
    if secret is not None:
        _write(config / "secret", secret, 0, base, 0o440)
    if main_command is not None:
        _write(config / "main", main_command, 0, base, 0o440)
    return own


def write_resolv_conf(layer: Path, content: str) -> None:
    """Rewrite the sandbox's resolv.conf in place (the bind mount holds the inode). A full disk
    is no obstacle: the truncation frees the old content's block first."""
    path = own_dir(layer) / "etc" / "resolv.conf"
    if not own_dir(layer).is_dir():  # a sandbox made before its disk held its own files
        path = layer.parent / "etc" / "resolv.conf"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, content.encode())
    finally:
        os.close(fd)


def open_agent_log(layer: Path) -> int:
    """Open the agent's log for appending, rotating it first if it grew past the limit (a
    sandbox may have filled it: what it wrote stays within its quota, and is dropped here).
    Opened through a detached mount so that ``/proc/1/fd/1`` inside shows no host path."""
    own = own_dir(layer)
    log = own / "agent.log"
    with contextlib.suppress(FileNotFoundError):
        if log.lstat().st_size > LOG_MAX_BYTES:
            _keep_tail(log, own / "agent.log.1", LOG_MAX_BYTES)
            log.unlink()
    return mounts.open_detached(
        layer, f"{OWN_DIR}/agent.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT
    )


def _keep_tail(log: Path, rotated: Path, size: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        rotated.unlink()
    src = os.open(log, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.lseek(src, -size, os.SEEK_END)
        dst = os.open(rotated, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            while chunk := os.read(src, 1 << 16):
                os.write(dst, chunk)
        except OSError:
            pass  # a full disk: the tail is lost, the log is still cut below
        finally:
            os.close(dst)
    finally:
        os.close(src)


def secure_mount_points(rootfs: Path, base: int) -> None:
    """Make each of :data:`MOUNT_POINTS` a real directory of the sandbox's root, replacing
    whatever else the sandbox left there. Called before its processes start (none runs, so
    nothing races us); every step goes through directory fds opened with O_NOFOLLOW."""
    for relative in MOUNT_POINTS:
        *parents, name = relative.split("/")
        fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parents:
                child = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
                os.close(fd)
                fd = child
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_mode & 0o170000) == 0o040000:
                continue
            if st is not None:
                os.unlink(name, dir_fd=fd)  # a symlink, file, fifo, ...: not a directory
            os.mkdir(name, 0o755, dir_fd=fd)
            os.chown(name, base, base, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)
