"""The client side of the agent's ``GET /tunnel?port=N``: a raw byte stream to ``127.0.0.1:N``
inside a sandbox, for the ports gateway and the TCP proxy.

A sandbox's network namespace has nothing the host can reach, so every exposed port is reached
through the agent's own socket: an HTTP/1.1 request with ``Connection: Upgrade`` and ``Upgrade:
tcp``; the agent connects to the port, answers ``101 Switching Protocols`` and relays bytes both
ways (half-closes included) until both sides are done. Nothing listening → the agent's ``502``.

The handshake is read with ``MSG_PEEK`` so that the socket is handed over positioned exactly after
the ``101`` head: a server that speaks first (an SMTP banner, a database greeting) loses nothing,
and the socket can go to any consumer (asyncio streams, the ``websockets`` client).

Over the agent's Unix socket (the local engine) the request also says ``Sandlot-Tunnel: fd``, and
the agent answers ``200`` with the socket it connected inside the sandbox attached (SCM_RIGHTS):
the gateway then holds a TCP connection to the port itself and the agent relays nothing. An
agent from before that answers ``101`` and relays, as above. The received descriptor comes from
inside the sandbox, so it is checked to be what was asked for -- a connected TCP stream socket
-- and nothing else is accepted (a regular file, a pipe, a listening or Unix socket is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat

from sandlot.engines.base import AgentAddress
from sandlot.server.upstream import UpstreamError

MAX_HEAD = 16384
HANDSHAKE_TIMEOUT = 10.0
RELAY_CHUNK = 65536


class TunnelError(UpstreamError):
    """The tunnel could not be opened. ``status`` is the agent's answer (502: nothing listens on
    the port), or None when the agent itself could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


async def wait_readable(sock: socket.socket) -> None:
    """Wait until ``sock`` has data or an EOF to read (nothing is consumed)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def open_tunnel_socket(
    address: AgentAddress, secret: bytes | None, port: int, timeout: float = HANDSHAKE_TIMEOUT
) -> socket.socket:
    """A non-blocking socket carrying the raw stream to ``port`` in the sandbox."""
    loop = asyncio.get_running_loop()
    if address.unix_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where: str | tuple[str, int] = address.unix_path
    else:
        assert address.host is not None and address.port is not None
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        where = (address.host, address.port)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            try:
                await loop.sock_connect(sock, where)
            except OSError as exc:
                raise TunnelError(
                    f"the sandbox's agent is not reachable: {exc.strerror or exc}"
                ) from exc
            request = (
                f"GET /tunnel?port={port} HTTP/1.1\r\nHost: agent\r\n"
                "Connection: Upgrade\r\nUpgrade: tcp\r\n"
            ).encode()
            if secret is not None:
                request += b"Authorization: Bearer " + secret + b"\r\n"
            if sock.family == socket.AF_UNIX:
                request += b"Sandlot-Tunnel: fd\r\n"
            await loop.sock_sendall(sock, request + b"\r\n")
            head_length = await _peek_head(sock)
            status, length, passes_fd = _parse_head(sock.recv(head_length, socket.MSG_PEEK))
            if status == 200 and passes_fd:
                target = _receive_socket(sock, head_length)
                sock.close()
                return target
            sock.recv(head_length)  # exactly the head; what follows stays in the socket
            if status == 101:
                return sock
            body = b""
            while len(body) < min(length, 65536):
                await wait_readable(sock)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
            raise TunnelError(_error_text(body, status), status)
    except TimeoutError:
        sock.close()
        raise TunnelError(
            f"the sandbox's agent did not open a tunnel within {timeout:g}s"
        ) from None
    except BaseException:
        sock.close()
        raise


async def _peek_head(sock: socket.socket) -> int:
    """The length of the answer's head, once all of it has arrived (nothing is consumed)."""
    while True:
        await wait_readable(sock)
        try:
            peeked = sock.recv(MAX_HEAD, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise TunnelError(f"tunnel handshake failed: {exc.strerror or exc}") from exc
        if not peeked:
            raise TunnelError("the sandbox's agent closed the connection during the handshake")
        end = peeked.find(b"\r\n\r\n")
        if end >= 0:
            return end + 4
        if len(peeked) >= MAX_HEAD:
            raise TunnelError("tunnel handshake: response head too large")
        await asyncio.sleep(0.001)  # a partial head: let the rest arrive


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length and whether the answer says it carries the socket."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise TunnelError(f"malformed tunnel answer from the agent: {lines[0]!r}")
    length = 0
    passes_fd = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
        elif name == b"sandlot-tunnel":
            passes_fd = value.strip().lower() == b"fd"
    return int(parts[1]), length, passes_fd


def _receive_socket(sock: socket.socket, head_length: int) -> socket.socket:
    """Consume the answer's head and take the socket attached to it, after checking that it is
    a connected TCP stream socket (the agent is inside the sandbox: trust nothing it sends)."""
    try:
        _, fds, flags, _ = socket.recv_fds(sock, head_length, 4)
    except OSError as exc:
        raise TunnelError(f"tunnel handshake failed: {exc.strerror or exc}") from exc
    for extra in fds[1:]:
        os.close(extra)
    if not fds or flags & socket.MSG_CTRUNC:
        if fds:
            os.close(fds[0])
        raise TunnelError("the sandbox's agent announced a socket but sent none")
    fd = fds[0]
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise TunnelError("the sandbox's agent sent something that is not a socket")
        target = socket.socket(fileno=fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        if (
            target.type != socket.SOCK_STREAM
            or target.family not in (socket.AF_INET, socket.AF_INET6)
            or target.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        ):
            raise TunnelError("the sandbox's agent sent a socket that is not a TCP connection")
        target.getpeername()  # ENOTCONN for a socket that is not connected
        target.setblocking(False)
        target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        target.close()
        raise TunnelError(f"the sandbox's agent sent an unusable socket: {exc}") from exc
    except BaseException:
        target.close()
        raise
    return target


def _error_text(body: bytes, status: int) -> str:
    """The agent's error message, whatever shape its answer has (it is hostile input)."""
    text = body.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError, RecursionError):
        text = str(json.loads(body)["error"])
    if len(text) > 300:
        text = text[:300] + "..."
    return text or f"HTTP {status}"


async def open_tunnel(
    address: AgentAddress, secret: bytes | None, port: int, limit: int = 65536
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The tunnel as asyncio streams."""
    sock = await open_tunnel_socket(address, secret, port)
    try:
        if sock.family == socket.AF_UNIX:
            return await asyncio.open_unix_connection(sock=sock, limit=limit)
        return await asyncio.open_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise
