"""The gateway's side of the agent's fd hand-over (``Sandlot-Tunnel: fd``): the agent is inside
the sandbox, so whatever it attaches is checked. A fake agent on a Unix socket sends each kind of
descriptor a compromised agent could send; only a connected TCP socket is taken."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandlot.engines.base import AgentAddress
from sandlot.server.gateway.tunnel import TunnelError, open_tunnel_socket

HEAD = b"HTTP/1.1 200 OK\r\nSandlot-Tunnel: fd\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture
def fake_agent() -> Iterator[tuple[str, list[Callable[[socket.socket], None]]]]:
    """A Unix socket server; each connection is answered by the next queued function."""
    path = Path(tempfile.mkdtemp(prefix="sl-fd-")) / "a.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    answers: list[Callable[[socket.socket], None]] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096)
                assert b"Sandlot-Tunnel: fd" in request
                answers.pop(0)(conn)

    threading.Thread(target=serve, daemon=True).start()
    yield str(path), answers
    srv.close()
    path.unlink()
    path.parent.rmdir()


def _open(path: str) -> socket.socket:
    return asyncio.run(open_tunnel_socket(AgentAddress(unix_path=path), b"s", 80, timeout=5))


def _copies(fd: int) -> int:
    """How many of this process's descriptors refer to what ``fd`` refers to (other tests'
    threads may open and close descriptors meanwhile: a plain count would race them)."""
    ident = os.fstat(fd)
    found = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue
        found += (st.st_dev, st.st_ino) == (ident.st_dev, ident.st_ino)
    return found


def test_a_connected_tcp_socket_is_taken(
    fake_agent: tuple[str, list[Callable[[socket.socket], None]]],
) -> None:
    path, answers = fake_agent
    listener = socket.create_server(("127.0.0.1", 0))
    target = socket.create_connection(listener.getsockname())
    answers.append(lambda conn: socket.send_fds(conn, [HEAD], [target.fileno()]))
    got = _open(path)
    peer, _ = listener.accept()
    with got, peer, listener, target:
        assert got.family == socket.AF_INET and not got.getblocking()
        peer.sendall(b"hi")
        got.setblocking(True)
        assert got.recv(2) == b"hi"


def _refused(
    fake_agent: tuple[str, list[Callable[[socket.socket], None]]],
    answer: Callable[[socket.socket], None],
    message: str,
    sent: int | None = None,
) -> None:
    path, answers = fake_agent
    answers.append(answer)
    before = _copies(sent) if sent is not None else 0
    with pytest.raises(TunnelError, match=message):
        _open(path)
    if sent is not None:
        assert _copies(sent) == before  # nothing the agent sent is kept open


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: open("/etc/hostname", "rb"), "not a socket"),  # noqa: SIM115 (closed below)
        (lambda: os.fdopen(os.pipe()[0], "rb"), "not a socket"),
        (lambda: socket.socketpair()[0], "not a TCP connection"),
        (lambda: socket.create_server(("127.0.0.1", 0)), "not a TCP connection"),
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "not a TCP connection"),
        (lambda: socket.socket(), "unusable socket"),  # TCP, never connected
    ],
    ids=["file", "pipe", "unix", "listening", "udp", "unconnected"],
)
def test_anything_else_is_refused(
    fake_agent: tuple[str, list[Callable[[socket.socket], None]]],
    make: Callable[[], object],
    message: str,
) -> None:
    thing = make()
    fd = thing.fileno()  # type: ignore[attr-defined]
    _refused(fake_agent, lambda conn: socket.send_fds(conn, [HEAD], [fd]), message, fd)
    thing.close()  # type: ignore[attr-defined]


def test_an_announced_socket_that_never_comes(
    fake_agent: tuple[str, list[Callable[[socket.socket], None]]],
) -> None:
    _refused(fake_agent, lambda conn: conn.sendall(HEAD), "sent none")


def test_extra_descriptors_are_closed(
    fake_agent: tuple[str, list[Callable[[socket.socket], None]]],
) -> None:
    path, answers = fake_agent
    listener = socket.create_server(("127.0.0.1", 0))
    target = socket.create_connection(listener.getsockname())
    extra = [os.open("/etc/hostname", os.O_RDONLY) for _ in range(3)]
    answers.append(lambda conn: socket.send_fds(conn, [HEAD], [target.fileno(), *extra]))
    before = [_copies(fd) for fd in (target.fileno(), *extra)]
    got = _open(path)
    after = [_copies(fd) for fd in (target.fileno(), *extra)]
    assert after == [before[0] + 1, *before[1:]]  # the TCP socket kept, the others closed
    for fd in extra:
        os.close(fd)
    got.close()
    target.close()
    listener.close()
