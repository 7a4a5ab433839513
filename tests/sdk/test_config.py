"""Where the SDK connects: arguments, SANDLOT_URL/SANDLOT_API_TOKEN, and the embedded default
(the local server on its Unix socket, started in the background when not running)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from sandlot import MissingApiTokenError, Sandbox
from sandlot.sdk._common import resolve_connection


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
    sock = str(runtime / "sandlot" / "sandlot.sock")
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
