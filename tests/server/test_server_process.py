"""`sandlot server` as users run it: its own process, --listen unix:/tcp:, socket permissions,
refusing a second server on a live socket, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sandlot.server.runner.serve import parse_listen

TESTS = Path(__file__).resolve().parents[1]


def test_parse_listen() -> None:
    assert parse_listen("unix:/a/b.sock").unix_path == "/a/b.sock"
    listen = parse_listen("tcp:127.0.0.1:7000")
    assert (listen.host, listen.port) == ("127.0.0.1", 7000)
    assert parse_listen("tcp:[::1]:7000").host == "::1"
    assert parse_listen(None).unix_path is not None
    for bad in ("tcp:host", "tcp:host:99999", "unix:", "http://x", "x:y"):
        with pytest.raises(ValueError, match="--listen"):
            parse_listen(bad)


def _start(args: list[str], short_dir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "SANDLOT_TEST_AGENTS": str(short_dir / "agents"),
        # its own state dir (one server per state dir) and runtime dir (a TCP server's admin
        # socket lives there)
        "SANDLOT_STATE_DIR": str(short_dir / "state"),
        "XDG_RUNTIME_DIR": str(short_dir / "xdg"),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sandlot.cli",
            "server",
            "--engine",
            "support.agent_engine:from_env",
            "--database",
            f"sqlite:///{short_dir / 'db'}",
            "--log-level",
            "warning",
            *args,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for(predicate: object, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode() if proc.stdout else "died")
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)


def test_unix_server_process(short_dir: Path) -> None:
    sock = short_dir / "rt" / "sandlot.sock"
    proc = _start(["--listen", f"unix:{sock}"], short_dir)
    try:
        _wait_for(sock.exists, proc)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://x") as c:
            _wait_for(lambda: c.get("/v1/health").status_code == 200, proc)
            sb = c.post("/v1/sandboxes", json={}).json()
            r = c.post(
                f"/sandboxes/{sb['id']}/koyeb-sandbox/run",
                json={"cmd": "echo hi"},
                headers={"authorization": f"Bearer {sb['secret']}"},
            )
            assert r.json()["stdout"] == "hi\n"
        second = _start(["--listen", f"unix:{sock}"], short_dir)
        out, _ = second.communicate(timeout=30)
        assert second.returncode != 0 and f"(pid {proc.pid}) is already running".encode() in out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert not sock.exists()


def test_tcp_server_process(short_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _start(["--listen", f"tcp:127.0.0.1:{port}"], short_dir)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:

            def up() -> bool:
                try:
                    return c.get("/v1/health").status_code == 200
                except httpx.TransportError:
                    return False

            _wait_for(up, proc)
            assert c.get("/v1/sandboxes").status_code == 401
            assert c.post("/v1/tokens", json={"project": "p"}).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_bad_listen_is_a_usage_error(short_dir: Path) -> None:
    proc = _start(["--listen", "carrier-pigeon"], short_dir)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and b"--listen" in out


def test_engine_failure_at_start_is_a_clear_error(short_dir: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandlot.cli",
            "server",
            "--engine",
            "support.agent_engine:unavailable",
            "--listen",
            f"unix:{short_dir / 's.sock'}",
            "--database",
            f"sqlite:///{short_dir / 'db'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot start the engine: no runtime here (test)" in proc.stderr
    assert "Traceback" not in proc.stderr
