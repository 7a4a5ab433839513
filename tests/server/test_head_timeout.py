"""A request head must arrive in time: a connection that sends nothing, half a head or half the
HTTP/2 preface is answered 408 and closed instead of being held for ever (uvicorn alone times
out only idle keep-alive connections). Real server on 127.0.0.1 with a 1 s limit."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.agent_engine import AgentProcessEngine
from support.server import RunningServer, start_server

LIMIT = 1.0


@pytest.fixture
def tcp_server(engine: AgentProcessEngine, short_dir: Path) -> Iterator[RunningServer]:
    srv = start_server(engine, f"sqlite:///{short_dir / 'db'}", tcp=True, head_timeout=LIMIT)
    yield srv
    srv.stop()


def _connect(srv: RunningServer) -> socket.socket:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    started = time.monotonic()
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out, time.monotonic() - started


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /v1/health HTTP/1.1\r\nHost: x\r\n", b"PRI * HTTP/2.0\r\n"],
    ids=["nothing", "half-a-head", "half-the-preface"],
)
def test_incomplete_heads_are_cut_off(tcp_server: RunningServer, sent: bytes) -> None:
    with _connect(tcp_server) as s:
        s.sendall(sent)
        out, waited = _read_until_closed(s)
    assert out.startswith(b"HTTP/1.1 408 ") and b"request head not received in time" in out
    assert LIMIT * 0.5 < waited < LIMIT + 5


def test_a_slow_but_complete_head_and_keep_alive(tcp_server: RunningServer) -> None:
    with _connect(tcp_server) as s:
        for part in (b"GET /v1/health HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            s.sendall(part)
            time.sleep(LIMIT / 4)
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        # then idle keep-alive, then half a head: the limit applies to every request
        time.sleep(LIMIT / 2)
        s.sendall(b"GET /v1/health HTTP/1.1\r\n")
        out, _ = _read_until_closed(s)
    assert out.startswith(b"HTTP/1.1 408 ")
    # the server goes on
    assert httpx.get(tcp_server.url + "/v1/health", timeout=10).status_code == 200


def test_long_requests_are_not_cut(tcp_server: RunningServer) -> None:
    """Only the head is timed: a request whose body takes longer is not cut off."""
    with _connect(tcp_server) as s:
        s.sendall(b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{")
        time.sleep(LIMIT * 1.5)
        s.sendall(b"}")
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401 "), answer  # no token: but answered, not 408
