"""Where the SDK connects: arguments, SANDLOT_URL/SANDLOT_API_TOKEN, and the embedded default
(the local server on its Unix socket, started in the background when not running)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from sandlot import MissingApiTokenError, Sandbox
from sandlot.sdk._connection import resolve_connection


def test_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SANDLOT_URL", raising=False)
    monkeypatch.delenv("SANDLOT_API_TOKEN", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    conn = resolve_connection(None, None)
    assert conn.unix_path == str(tmp_path / "sandlot" / "sandlot.sock") and conn.autostart
    conn = resolve_connection("unix:/x/y.sock", None)
    assert conn.unix_path == "/x/y.sock" and not conn.autostart
    with pytest.raises(MissingApiTokenError, match="api_token"):
        resolve_connection("http://example:7000", None)
    monkeypatch.setenv("SANDLOT_API_TOKEN", "from-env")
    assert resolve_connection("http://example:7000", None).api_token == "from-env"
    assert resolve_connection("http://example:7000", "arg").api_token == "arg"  # args win
    monkeypatch.setenv("SANDLOT_URL", "http://env:1")
    assert resolve_connection(None, None).base_url == "http://env:1"
    assert resolve_connection("http://arg:2", None).base_url == "http://arg:2"
    for bad in ("ftp://x", "unix:", "nonsense"):
        with pytest.raises(ValueError):
            resolve_connection(bad, "t")


def _server_pids(sock: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "sandlot.cli server" in cmd and sock in cmd:
                pids.append(int(entry.name))
    return pids


@pytest.mark.root
def test_autostarts_local_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from support.local import IMAGES_DIR, local_engine_unavailable

    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    runtime = Path("/tmp") / f"sl-rt-{os.getpid()}"
    state = Path("/tmp") / f"sl-st-{os.getpid()}"  # short: agent sockets live under it
    state.mkdir()
    # Reuse the host's built images (a fresh state dir would have to build them).
    (state / "images").symlink_to(IMAGES_DIR)
    monkeypatch.delenv("SANDLOT_URL", raising=False)
    monkeypatch.delenv("SANDLOT_API_TOKEN", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("SANDLOT_STATE_DIR", str(state))
    from sandlot.paths import default_server_socket

    # the socket of this state dir (sandlot-<hash>.sock: not the default state dir's)
    sock = str(default_server_socket())
    assert Path(sock).parent == runtime / "sandlot"
    try:
        with Sandbox.create(image="busybox") as sb:
            assert sb.exec("echo auto").stdout == "auto\n"
        assert len(_server_pids(sock)) == 1
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        # A second client reuses the running server.
        with Sandbox.create(image="busybox") as sb:
            assert sb.exec("true").code == 0
        assert len(_server_pids(sock)) == 1
        assert (runtime / "sandlot" / "sandlot-server.log").exists()
        # After an upgrade (here: this process pretends to be a newer build) the SDK restarts
        # the server it started; sandboxes live through it.
        kept = Sandbox.create(image="busybox")
        before = _server_pids(sock)
        import sandlot._build
        from sandlot.sdk import _autostart

        monkeypatch.setattr(sandlot._build, "build_id", lambda: "a-newer-build")
        _autostart._checked.discard(sock)
        with Sandbox.create(image="busybox") as sb:
            assert sb.exec("echo new").stdout == "new\n"
        after = _server_pids(sock)
        assert len(after) == 1 and after != before
        assert kept.exec("echo survived").stdout == "survived\n"
        kept.delete()
    finally:
        for pid in _server_pids(sock):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _server_pids(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        import shutil

        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def test_autostart_failure_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A server that cannot start (here: its state dir is a file) gives a clear error with its
    log, not a hang."""
    runtime = Path("/tmp") / f"sl-rtf-{os.getpid()}"
    bad_state = tmp_path / "not-a-dir"
    bad_state.write_text("")
    monkeypatch.delenv("SANDLOT_URL", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("SANDLOT_STATE_DIR", str(bad_state))
    from sandlot import SandboxServiceError

    try:
        with pytest.raises(SandboxServiceError, match="exited at start"):
            Sandbox.create(image="busybox")
    finally:
        import shutil

        shutil.rmtree(runtime, ignore_errors=True)


class _FakeServer:
    """A Unix socket answering every connection with ``health`` as ``/v1/health``."""

    def __init__(self, path: Path, health: dict[str, object]) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.body = json.dumps(health).encode()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(self.body)
            with conn, contextlib.suppress(OSError):  # probes connect and leave at once
                if conn.recv(65536):
                    conn.sendall(head + self.body)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    ("same_package", "build"),
    [(True, None), (False, "old-build")],
    ids=["current", "another-installation"],
)
def test_current_or_foreign_local_server_is_left_alone(
    tmp_path: Path, same_package: bool, build: str | None
) -> None:
    """Only a server of this installation with another build is stopped (SIGTERM), and only if
    it is the process behind the socket (tests/security/test_sec_localtrust.py): a current
    build, or another installation's server, is left alone."""
    from sandlot._build import PACKAGE_DIR, build_id
    from sandlot.sdk._autostart import _stop_if_outdated

    server = _FakeServer(tmp_path / "s.sock", {})
    health = {
        "status": "ok",
        "build": build or build_id(),
        "package": str(PACKAGE_DIR) if same_package else "/elsewhere/sandlot",
        "pid": os.getpid(),
    }
    server.body = json.dumps(health).encode()
    with contextlib.ExitStack() as stack:
        stack.callback(server.close)
        previous = signal.signal(signal.SIGTERM, lambda *_: pytest.fail("SIGTERM sent"))
        stack.callback(signal.signal, signal.SIGTERM, previous)
        _stop_if_outdated(str(tmp_path / "s.sock"))
