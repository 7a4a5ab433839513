"""The local server, started on demand: the first SDK call on the default socket starts
``sandlot server`` in the background when nothing answers there (and restarts it when it runs
an older build of this installation)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx

from sandlot.local_trust import LocalTrustError, open_private_file, private_dir, signal_server
from sandlot.sdk._limits import SERVER_START_TIMEOUT
from sandlot.sdk._primitives import sync_uds_transport
from sandlot.sdk.errors import SandboxServiceError, SandboxTimeoutError

log = logging.getLogger("sandlot")

_server_lock = threading.Lock()


def ensure_local_server(path: str) -> None:
    """Start the local server on ``path`` in the background unless something answers there.

    The server runs detached in its own session (it outlives this process, like a user
    daemon) and logs to ``sandlot-server.log`` next to its socket. A lock file keeps two
    processes from starting two servers at once. The socket's directory must be ours and
    private (:func:`sandlot.local_trust.private_dir`): it is checked before anything in it is
    opened or connected to.
    """
    import fcntl
    import subprocess
    import sys

    if path in _checked and _socket_answers(path):
        return
    with _server_lock:
        try:
            directory = private_dir(Path(path).parent)
        except (LocalTrustError, OSError) as exc:
            raise SandboxServiceError(f"cannot use the local sandlot server: {exc}") from None
        lock_fd = open_private_file(directory / "autostart.lock")
        with os.fdopen(lock_fd, "r+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path not in _checked:
                _checked.add(path)
                _stop_if_outdated(path)
            if _socket_answers(path):
                return
            log_path = directory / "sandlot-server.log"
            log_fd = open_private_file(log_path, os.O_WRONLY | os.O_APPEND)
            with os.fdopen(log_fd, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "sandlot.cli", "server", "--listen", f"unix:{path}"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    close_fds=True,
                )
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while time.monotonic() < deadline:
                if _socket_answers(path):
                    return
                if proc.poll() is not None:
                    raise SandboxServiceError(
                        f"the local sandlot server exited at start (code {proc.returncode}); "
                        f"its log {log_path} ends with:\n{_tail(str(log_path))}"
                    )
                time.sleep(0.02)
            raise SandboxTimeoutError(
                f"the local sandlot server did not start within {SERVER_START_TIMEOUT:g}s; "
                f"see {log_path}"
            )


#: Socket paths whose server's build this process has compared with its own.
_checked: set[str] = set()


def _stop_if_outdated(path: str) -> None:
    """Stop the server on ``path`` if it is this installation of sandlot but an older build
    (upgraded or edited since it started); :func:`ensure_local_server` then starts the new one.
    Its sandboxes live on: a server recovers them at start. A server of another installation
    (another virtualenv sharing the default socket) is left alone, or two projects would stop
    each other's servers in turn. The pid its health names is signalled only if it is the
    process behind the socket (:func:`sandlot.local_trust.signal_server`)."""
    import signal

    from sandlot._build import PACKAGE_DIR, build_id

    health = _local_health(path)
    if health is None:
        return
    if health.get("package") != str(PACKAGE_DIR) or health.get("build") in (None, build_id()):
        return
    pid = health.get("pid")
    if not isinstance(pid, int) or pid <= 1:
        return
    if not signal_server(path, pid, signal.SIGTERM):
        log.warning("the local sandlot server on %s runs an older build; not ours to stop", path)
        return
    log.warning(
        "the local sandlot server (pid %d) runs an older build of this installation: restarting it",
        pid,
    )
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while _socket_answers(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _local_health(path: str) -> dict[str, Any] | None:
    """``GET /v1/health`` on the Unix socket; None if nothing sensible (or trusted) answers."""
    try:
        with httpx.Client(transport=sync_uds_transport(path), timeout=5.0) as client:
            response = client.get("http://sandlot/v1/health")
        answer = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def _socket_answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def async_ensure_local_server(path: str) -> None:
    await anyio.to_thread.run_sync(ensure_local_server, path)


def sync_ensure_local_server(path: str) -> None:
    ensure_local_server(path)
