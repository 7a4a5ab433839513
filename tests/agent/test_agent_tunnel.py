"""TCP tunnels through the agent's socket to ports inside the sandbox (for the gateway)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from agentlib import Agent


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP server on loopback that echoes, upper-cased, until the client half-closes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
                    c.sendall(chunk.upper())
                c.sendall(b"|total=%d" % len(data))

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def _tunnel(
    agent: Agent,
    port: object,
    extra: str = "Connection: Upgrade\r\nUpgrade: tcp\r\n",
    early: bytes = b"",
) -> tuple[socket.socket, bytes]:
    s = agent.raw()
    s.sendall(
        f"GET /tunnel?port={port} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {agent.secret}\r\n"
        f"{extra}\r\n".encode()
        + early
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            break
        head += chunk
    return s, head


def test_relays_both_ways_with_half_close(agent: Agent, echo_port: int) -> None:
    s, head = _tunnel(agent, echo_port, early=b"early-")
    assert head.startswith(b"HTTP/1.1 101 ") and b"Upgrade: tcp" in head
    payload = b"x" * 200_000
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    assert out == b"EARLY-" + b"X" * 200_000 + b"|total=200006"


def test_errors(agent: Agent, echo_port: int) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    for port, extra, status in [
        (dead_port, "Connection: Upgrade\r\nUpgrade: tcp\r\n", b"502"),
        (echo_port, "", b"426"),
        ("http", "Connection: Upgrade\r\nUpgrade: tcp\r\n", b"400"),
        (70000, "Connection: Upgrade\r\nUpgrade: tcp\r\n", b"400"),
    ]:
        s, head = _tunnel(agent, port, extra)
        s.close()
        assert head.startswith(b"HTTP/1.1 " + status), (port, head)


def test_many_tunnels_leave_no_fds(agent: Agent, echo_port: int) -> None:
    s, _ = _tunnel(agent, echo_port)
    s.close()
    base = agent.fd_count()
    for _ in range(10):
        s, _head = _tunnel(agent, echo_port)
        s.sendall(b"a")
        assert s.recv(10) == b"A"
        s.close()  # abrupt: no half-close
    import time

    time.sleep(0.3)
    assert agent.fd_count() <= base + 1


def test_fd_mode_hands_over_the_connected_socket(agent: Agent, echo_port: int) -> None:
    """``Sandlot-Tunnel: fd`` over the Unix socket: a 200 carrying the agent's own connection to
    the port (SCM_RIGHTS); the agent relays nothing and keeps no descriptor for it."""
    s, _ = _tunnel(agent, echo_port)
    s.close()
    base = agent.fd_count()
    s = agent.raw()
    request = (
        f"GET /tunnel?port={echo_port} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
        f"{agent.secret}\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nSandlot-Tunnel: fd\r\n\r\n"
    )
    s.sendall(request.encode())
    head, fds, _, _ = socket.recv_fds(s, 4096, 4)
    assert head.startswith(b"HTTP/1.1 200 ") and b"Sandlot-Tunnel: fd" in head, head
    assert head.endswith(b"\r\n\r\n") and len(fds) == 1
    assert s.recv(10) == b""  # the agent is done with this connection
    s.close()
    with socket.socket(fileno=fds[0]) as conn:
        assert conn.family == socket.AF_INET and conn.getpeername()[1] == echo_port
        conn.sendall(b"direct")
        conn.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := conn.recv(65536):
            out += chunk
    assert out == b"DIRECT|total=6"
    import time

    time.sleep(0.3)
    assert agent.fd_count() <= base + 1


def test_fd_mode_errors_are_plain_answers(agent: Agent) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    s, head = _tunnel(
        agent, dead_port, "Connection: Upgrade\r\nUpgrade: tcp\r\nSandlot-Tunnel: fd\r\n"
    )
    s.close()
    assert head.startswith(b"HTTP/1.1 502 "), head


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def test_idle_tunnels_share_one_relay_thread(agent: Agent) -> None:
    """200 open, idle tunnels: the agent holds their sockets in one relay loop, not a thread
    pair each (10,000 WebSockets through a gVisor sandbox's agent spent its pids limit)."""
    import time

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(512)
    held: list[socket.socket] = []
    clients: list[socket.socket] = []
    try:
        for _ in range(200):
            s, head = _tunnel(agent, holder.getsockname()[1])
            assert head.startswith(b"HTTP/1.1 101 ")
            clients.append(s)
            held.append(holder.accept()[0])
        time.sleep(0.3)  # the request threads finish handing over
        assert _threads(agent.proc.pid) < 20
        # every one of them still carries bytes, both ways
        for i, (client, peer) in enumerate(zip(clients, held, strict=True)):
            client.sendall(b"%d" % i)
            assert peer.recv(16) == b"%d" % i
            peer.sendall(b"back")
            assert client.recv(16) == b"back"
    finally:
        for s in clients + held:
            s.close()
        holder.close()


def test_a_slow_reader_gets_everything_in_order(agent: Agent, echo_port: int) -> None:
    """8 MB through the relay while the client reads slowly: partial sends and backpressure
    lose and reorder nothing."""
    import time

    s, _ = _tunnel(agent, echo_port)
    payload = bytes(range(256)) * 32768  # 8 MiB
    sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
    sender.start()
    out = bytearray()
    while chunk := s.recv(4096):
        out += chunk
        if len(out) < 65536:
            time.sleep(0.001)
    sender.join()
    s.close()
    assert bytes(out) == payload.upper() + b"|total=%d" % len(payload)
