"""WebSockets (and h2c upgrades) to exposed ports passed through as bytes: uvicorn's ``ws``
and ``http`` protocol classes for ``sandlot server``.

ASGI hands a WebSocket to the app message by message, which is what
:mod:`sandlot.server.gateway.ports.websocket` relays when the server in front is any ASGI
server. Served by sandlot's own runner, uvicorn is given this protocol class instead: an upgrade
aimed at an exposed port has its request head (path rewritten, tokens removed,
``X-Forwarded-*`` added) written into a tunnel to the sandbox's port, and from then on bytes
flow both ways untouched -- the ``101`` is the sandbox server's own, extensions such as
permessage-deflate are negotiated end to end, and frames are not parsed twice. The checks before
that (exposed? token? wake the sandbox) are the gateway's own
(:meth:`sandlot.server.gateway.ports.router.PortRouter.serve`). Every other WebSocket goes to
uvicorn's usual implementation.

Once the upgrade request is written, both connections -- the client's and the one into the
sandbox -- go to a relay process (:mod:`sandlot.server.gateway.relay`), which copies bytes with
flow control both ways until both directions end. The gateway keeps neither descriptor, only
the request's place in the sandbox's activity (an open WebSocket keeps its sandbox awake).

This is the one module that builds on uvicorn's private classes, which is why pyproject pins
uvicorn to one minor version (0.54): ``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol``
(subclassed: its ``data_received`` and timeout handling), and
``uvicorn.protocols.websockets.auto.AutoWebSocketsProtocol`` (the fallback handed the
connection), both constructed as uvicorn does (``config``, ``server_state``, ``app_state``).
Moving the pin: run tests/server/test_h2serve*.py and tests/sdk/test_ports*.py.
"""

from __future__ import annotations

import asyncio
import http
import logging
import os
import socket
from typing import Any, cast
from urllib.parse import unquote

from starlette.types import Message

from sandlot.server.gateway.asgi import refuse_websocket
from sandlot.server.gateway.relay import RelayError
from sandlot.server.gateway.tunnel import TunnelError, open_tunnel_socket
from sandlot.server.upstream import AgentPool

log = logging.getLogger("sandlot.ports")

_DROP = {b"x-sandlot-project", b"proxy-authorization", b"content-length", b"x-forwarded-prefix"}


def _fallback_class() -> Any:
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    return AutoWebSocketsProtocol


class PortsWebSocketProtocol(asyncio.Protocol):
    def __init__(self, config: Any, server_state: Any, app_state: Any, **kwargs: Any) -> None:
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.kwargs = kwargs
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.pending: list[bytes] = []
        self.client_eof = False
        #: The connection went to a relay process: closing the transport ends nothing.
        self.handed_over = False
        self.error_status = 0
        self.error_headers: list[tuple[bytes, bytes]] = []

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.task is None:  # the upgrade request's head, rebuilt by uvicorn
            self._start(bytes(data))
            return
        # Reading is paused from then on; whatever arrived before goes ahead of the relay.
        self.pending.append(bytes(data))

    def eof_received(self) -> bool:
        self.client_eof = True
        return True  # keep the other direction open

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        if self.task is not None and not self.task.done() and not self.handed_over:
            self.task.cancel()

    def shutdown(self) -> None:  # uvicorn's graceful shutdown
        if self.transport is not None:
            self.transport.close()

    # -- routing -------------------------------------------------------------------------------

    def _start(self, head: bytes) -> None:
        assert self.transport is not None
        ports = _ports_of(self.config)
        scope = _scope(head, self.transport) if ports is not None else None
        target = ports.router.match(scope) if ports is not None and scope is not None else None
        if ports is None or scope is None or target is None:
            fallback = _fallback_class()(
                config=self.config,
                server_state=self.server_state,
                app_state=self.app_state,
                **self.kwargs,
            )
            fallback.connection_made(self.transport)
            fallback.data_received(head)
            self.transport.set_protocol(fallback)
            return
        self.server_state.connections.add(self)
        self.transport.pause_reading()  # nothing to forward to yet
        scope["extensions"] = {
            "websocket.http.response": {},
            "sandlot.raw_tunnel": {"run": self._run},
        }
        self.task = asyncio.get_running_loop().create_task(self._serve(ports, target, scope))

    async def _serve(self, ports: Any, target: Any, scope: dict[str, Any]) -> None:
        try:
            await ports.router.serve(target, scope, self._receive, self._send)
        except asyncio.CancelledError:
            pass
        except Exception:  # pragma: no cover - logged; the connection is closed below
            log.exception("WebSocket pass-through to %s failed", target.sandbox_id)
        finally:
            if self.transport is not None:
                self.transport.close()

    async def _receive(self) -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def _send(self, message: Message) -> None:
        """The gateway's refusals (an HTTP answer instead of the upgrade)."""
        assert self.transport is not None
        kind = message["type"]
        if kind == "websocket.http.response.start":
            self.error_status = int(message["status"])
            self.error_headers = list(message.get("headers") or [])
        elif kind == "websocket.http.response.body":
            status = self.error_status or 500
            try:
                reason = http.HTTPStatus(status).phrase
            except ValueError:
                reason = ""
            head = [f"HTTP/1.1 {status} {reason}\r\n".encode()]
            head += [k + b": " + v + b"\r\n" for k, v in self.error_headers]
            head.append(b"connection: close\r\n\r\n")
            self.transport.write(b"".join(head) + message.get("body", b""))
        elif kind == "websocket.close":
            self.transport.write(
                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )

    # -- the pass-through ----------------------------------------------------------------------

    async def _run(self, agent: AgentPool, fwd: Any, scope: dict[str, Any]) -> None:
        """Open the connection to the port, send it the upgrade request, then hand both
        connections to a relay process (:mod:`sandlot.server.gateway.relay`) and wait until it
        reports them done -- holding no descriptor and doing no copying here meanwhile."""
        assert self.transport is not None
        ports = _ports_of(self.config)
        try:
            await ports.relays.ready()
        except RelayError as exc:
            body = {"error": f"no relay for the connection: {exc}", "code": "relay_unavailable"}
            await refuse_websocket(scope, self._send, 503, body)
            return
        try:
            upstream = await open_tunnel_socket(agent.address, agent.secret, fwd.port)
        except TunnelError as exc:
            await refuse_websocket(scope, self._send, 502, fwd.bad_gateway(exc))
            return
        path = fwd.target_path(scope)
        if fwd.query:
            path += "?" + fwd.query
        head = [f"GET {path} HTTP/1.1\r\n".encode("latin-1")]
        for k, v in fwd.headers(scope, keep_upgrade=True):
            head.append(k + b": " + v + b"\r\n")
        head.append(b"\r\n")
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(upstream, b"".join(head) + b"".join(self.pending))
            if self.client_eof:
                upstream.shutdown(socket.SHUT_WR)
            client = self._take_socket()
        except OSError as exc:
            upstream.close()
            await refuse_websocket(scope, self._send, 502, fwd.bad_gateway(exc))
            return
        self.pending.clear()
        try:
            await ports.relays.splice(client, upstream, (fwd.target.sandbox_id, fwd.port))
        except RelayError as exc:
            log.warning("WebSocket to %s:%d not relayed: %s", scope.get("path"), fwd.port, exc)

    def _take_socket(self) -> socket.socket:
        """The client's connection as a socket of our own; uvicorn's transport is closed
        without touching the connection (no shutdown), which goes on in the relay."""
        assert self.transport is not None
        if self.transport.get_extra_info("sslcontext") is not None:
            raise OSError("TLS connections cannot be handed to a relay")
        raw = self.transport.get_extra_info("socket")
        if raw is None:
            raise OSError("the client's transport has no socket")
        client = socket.socket(fileno=os.dup(raw.fileno()))
        self.handed_over = True
        self.transport.abort()
        return client


def _ports_of(config: Any) -> Any:
    """The app's exposed ports (:class:`sandlot.server.gateway.ports.service.Ports`), if any."""
    app = getattr(config, "app", None)
    return getattr(getattr(app, "state", None), "ports", None)


def _scope(head: bytes, transport: asyncio.Transport) -> dict[str, Any] | None:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    raw = parts[1]
    raw_path, _, query = raw.partition(b"?")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if sep:
            headers.append((name.strip().lower(), value.strip()))
    peer = transport.get_extra_info("peername")
    return {
        "type": "websocket",
        "scheme": "ws",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": query,
        "headers": headers,
        "client": peer[:2] if isinstance(peer, tuple) else None,
        "subprotocols": [],
    }


#: A request head (or a new connection's first one) must be complete within this many seconds.
HEAD_TIMEOUT = 30.0
_HEAD_TIMEOUT_BODY = b'{"error": "request head not received in time", "code": "timeout"}'
_HEAD_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(_HEAD_TIMEOUT_BODY)).encode()
    + b"\r\nconnection: close\r\n\r\n"
    + _HEAD_TIMEOUT_BODY
)


def ports_http_protocol(head_timeout: float = HEAD_TIMEOUT) -> Any:
    """uvicorn's HTTP protocol class, extended: an ``Upgrade: h2c`` request aimed at an exposed
    port is handed to :class:`PortsWebSocketProtocol` (which passes it, and everything after,
    through as bytes) instead of being answered in HTTP/1.1; a connection that opens with the
    HTTP/2 preface is handed to :mod:`.h2serve` (see :func:`_h2_preface_hook`). Other requests
    are unchanged.

    It also bounds how long a request head may take (``head_timeout``, from the connection's
    start or the request's first byte): uvicorn times out idle keep-alive connections but not a
    new connection that sends nothing, or half a head, so a client could hold descriptors for
    ever with a few bytes. Such a connection gets ``408`` and is closed."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class PortsHttpToolsProtocol(HttpToolsProtocol):
        #: The connection's first bytes while they may still be the HTTP/2 preface; None once
        #: decided.
        _first_bytes: bytes | None = b""
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            if self._first_bytes is not None:
                data = _h2_preface_hook(self, self._first_bytes + data)
                if not data:
                    return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self.cancel_head_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self.cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return
            self.transport.write(_HEAD_TIMEOUT_ANSWER)
            self.transport.close()

        def _should_upgrade(self) -> bool:
            if self._get_upgrade() == b"h2c" and self._h2c_to_a_port():
                return True
            return super()._should_upgrade()

        def _h2c_to_a_port(self) -> bool:
            ws_class = self.ws_protocol_class
            if not (isinstance(ws_class, type) and issubclass(ws_class, PortsWebSocketProtocol)):
                return False
            ports = _ports_of(self.config)
            if ports is None:
                return False
            raw_path = self.url.split(b"?", 1)[0]
            scope = {"path": unquote(raw_path.decode("latin-1")), "headers": self.headers}
            return ports.router.match(scope) is not None

    return PortsHttpToolsProtocol


def _h2_preface_hook(protocol: Any, head: bytes) -> bytes:
    """HTTP/2 with prior knowledge on uvicorn's HTTP/1.1 protocol: while ``head`` (the
    connection's first bytes) may still become the preface, keep it and answer ``b""``; when it
    is the preface, hand the connection to :class:`.h2serve.H2ServerProtocol` (``b""``);
    otherwise it is HTTP/1.1, returned for uvicorn to parse."""
    from sandlot.server.runner.h2serve import PREFACE, switch_to_h2

    if len(head) < len(PREFACE) and PREFACE.startswith(head):
        protocol._first_bytes = head
        return b""
    protocol._first_bytes = None
    if not head.startswith(PREFACE):
        return head
    protocol.cancel_head_timer()  # HTTP/2 from here: h2serve has its own timeouts
    protocol.connections.discard(protocol)
    protocol._unset_keepalive_if_required()
    switch_to_h2(
        protocol.config, protocol.server_state, protocol.app_state, protocol.transport, head
    )
    return b""
