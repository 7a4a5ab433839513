"""What a local client may trust on this host: its runtime directory, and the process behind a
Unix socket.

Why: without ``XDG_RUNTIME_DIR`` the local server's socket lives in ``/tmp/sandlot-$UID``, a
name any local user can create first. Tried as another user against root's SDK: a planted
``autostart.lock`` symlink made root truncate a file, a fake ``/v1/health`` naming a pid made
root SIGTERM it, and a fake socket received root's create requests with their env secrets.

So, as the XDG base-directory spec and ssh-agent do:

- the runtime directory must be a real directory (not a symlink), ours, and mode 0700; one
  that is not is refused with what to do, never repaired (someone may already be inside);
- files in it are opened with ``O_NOFOLLOW``;
- before a byte is sent on a Unix socket, the kernel says who listens on it (``SO_PEERCRED``):
  a server running as neither us nor root is refused;
- a pid is signalled only through a pidfd of the process that listens on the socket (its
  ``SO_PEERCRED`` pid), running our Python with ``server`` among its arguments.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path


class LocalTrustError(RuntimeError):
    """A runtime directory or a local server we must not trust; the message says what to do."""


@dataclass(frozen=True)
class Peer:
    """Credentials of the process behind a Unix socket, as the kernel recorded them."""

    pid: int
    uid: int
    gid: int


def private_dir(path: Path) -> Path:
    """Create ``path`` (0700) if missing; refuse it unless it is a directory of ours, 0700."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = os.lstat(path)
    euid = os.geteuid()
    fix = (
        f"remove it (rm -rf {path}) and try again, or set XDG_RUNTIME_DIR to a private "
        "directory of yours"
    )
    if not stat.S_ISDIR(info.st_mode):
        raise LocalTrustError(f"{path} is not a directory (a symlink?): refusing it; {fix}")
    if info.st_uid != euid:
        raise LocalTrustError(
            f"{path} belongs to uid {info.st_uid}, not to you (uid {euid}): another user may "
            f"have created it first to intercept sandlot; refusing it. {fix[0].upper()}{fix[1:]}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise LocalTrustError(
            f"{path} has mode {mode:04o}: other users can reach into it; refusing it. "
            f"Run `chmod 700 {path}` if nobody else could have used it, else {fix}"
        )
    return path


def peer_of(sock: socket.socket) -> Peer:
    """``SO_PEERCRED`` of a connected Unix socket (for a client: the server that listens)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def check_server(sock: socket.socket, path: str) -> Peer:
    """The server behind ``sock`` (connected to ``path``) must run as us or as root."""
    peer = peer_of(sock)
    euid = os.geteuid()
    if peer.uid not in (euid, 0):
        raise LocalTrustError(
            f"refusing the sandlot server on {path}: it runs as uid {peer.uid}, not as you "
            f"(uid {euid}) or root -- another user may have put that socket there; nothing "
            "was sent to it"
        )
    return peer


def socket_peer(path: str, timeout: float = 5.0) -> Peer | None:
    """Who listens on ``path`` (connect, read ``SO_PEERCRED``, close); None if nobody."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError:
            return None
        return peer_of(s)


def signal_server(path: str, pid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid`` only if it is the process listening on ``path``, runs as us and
    is our Python running a server. Returns whether it was sent.

    The pidfd is opened first and the checks made after: should the pid be reused meanwhile,
    the checks see the process the pidfd points to, and the socket's listener no longer has
    that pid."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        peer = socket_peer(path)
        if peer is None or peer.pid != pid or peer.uid != os.geteuid():
            return False
        try:
            exe = os.path.realpath(f"/proc/{pid}/exe")
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if exe != os.path.realpath(sys.executable) or b"server" not in argv:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def open_private_file(path: Path, flags: int = os.O_RDWR) -> int:
    """Open (creating, 0600) a file in a private directory: never through a symlink, never
    inherited by children."""
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
