"""What one client can make the server hold in memory, measured on a real ``sandlot server``
process (its kernel peak-RSS counter, reset through ``/proc/PID/clear_refs`` before each
attack). Before: a 1 GiB JSON create body took the server to 3.1 GiB, and a chunked upload
through the gateway was gathered whole (2 GiB). Now JSON bodies stop at ``--max-json-body``
(413) and file bodies stream through.

These send 256 MiB (the old code held two to three times that); the bound is 64 MiB of growth.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

TESTS = Path(__file__).resolve().parents[1]
TOTAL = 256 * 1024 * 1024
PIECE = 1024 * 1024
RSS_BOUND_MIB = 64


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    sock: str
    agents: Path

    def client(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=self.sock), base_url="http://x", timeout=120
        )

    def status(self, name: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) // 1024
        raise AssertionError(name)

    def reset_peak(self) -> int:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        return self.status("VmRSS")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    root = Path(tempfile.mkdtemp(prefix="sl-gm-"))
    sock = root / "s.sock"
    env = {
        **os.environ,
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "SANDLOT_TEST_AGENTS": str(root / "agents"),
        # its own state and runtime dirs: one server per state dir, and a user's own server
        # on the default one must not make this test fail
        "SANDLOT_STATE_DIR": str(root / "state"),
        "XDG_RUNTIME_DIR": str(root / "xdg"),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sandlot.cli",
            "server",
            "--engine",
            "support.agent_engine:from_env",
            "--database",
            f"sqlite:///{root / 'db'}",
            "--listen",
            f"unix:{sock}",
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        srv = Server(proc, str(sock), root / "agents")
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the server died"
            assert time.monotonic() < deadline, "the server did not start"
            if sock.exists():
                try:
                    with srv.client() as c:
                        if c.get("/v1/health").status_code == 200:
                            break
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _send(sock_path: str, head: bytes, pieces: Iterator[bytes]) -> bytes:
    """Send a request head and as much of its body as the server takes (it may answer and stop
    reading early), then the server's answer (head and the start of the body)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock_path)
        s.settimeout(5)
        s.sendall(head)
        try:
            for piece in pieces:
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the server stopped reading: its answer says why
        s.settimeout(60)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < 200:
            data = s.recv(65536)
            if not data:
                break
            answer += data
        return answer


def _json_body(chunked: bool) -> Iterator[bytes]:
    """A JSON document of :data:`TOTAL` bytes and more, in pieces (framed when ``chunked``)."""
    filler = b"a" * PIECE
    parts = [b'{"x": "', *(filler for _ in range(TOTAL // PIECE)), b'"}']
    for part in parts:
        yield b"%x\r\n" % len(part) + part + b"\r\n" if chunked else part
    if chunked:
        yield b"0\r\n\r\n"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_huge_json_body_is_refused_in_bounded_memory(server: Server, chunked: bool) -> None:
    length = TOTAL + len(b'{"x": ""}')
    framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % length
    head = b"POST /v1/sandboxes HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    before = server.reset_peak()
    answer = _send(server.sock, head + framing + b"\r\n\r\n", _json_body(chunked))
    growth = server.status("VmHWM") - before
    print(f"\n256 MiB JSON body ({'chunked' if chunked else 'with a length'}): +{growth} MiB peak")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"body_too_large" in answer and b"limit" in answer
    assert growth < RSS_BOUND_MIB, f"the server grew by {growth} MiB"
    with server.client() as c:  # and it goes on serving
        assert c.get("/v1/health").status_code == 200


def test_chunked_upload_through_the_gateway_streams(server: Server) -> None:
    with server.client() as c:
        sb = c.post("/v1/sandboxes", json={}).json()
        try:
            target = server.agents / sb["id"] / "home" / "big.bin"
            head = (
                f"PUT /sandboxes/{sb['id']}/koyeb-sandbox/files?path={target} HTTP/1.1\r\n"
                f"host: x\r\nauthorization: Bearer {sb['secret']}\r\n"
                "transfer-encoding: chunked\r\n\r\n"
            ).encode()
            filler = b"b" * PIECE
            pieces = (
                *(b"%x\r\n" % PIECE + filler + b"\r\n" for _ in range(TOTAL // PIECE)),
                b"0\r\n\r\n",
            )
            before = server.reset_peak()
            answer = _send(server.sock, head, iter(pieces))
            growth = server.status("VmHWM") - before
            print(f"\n256 MiB chunked upload through the gateway: +{growth} MiB peak")
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
            assert target.stat().st_size == TOTAL
            assert growth < RSS_BOUND_MIB, f"the server grew by {growth} MiB"
        finally:
            c.delete(f"/v1/sandboxes/{sb['id']}")
