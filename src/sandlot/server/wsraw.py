"""WebSockets (and h2c upgrades) to exposed ports passed through as bytes: uvicorn's ``ws``
and ``http`` protocol classes for ``sandlot server``.

ASGI hands a WebSocket to the app message by message, which is what :mod:`.ports` relays when
the server in front is any ASGI server. Served by sandlot's own runner, uvicorn is given this
protocol class instead: an upgrade aimed at an exposed port has its request head (path rewritten,
tokens removed, ``X-Forwarded-*`` added) written into a tunnel to the sandbox's port, and from
then on bytes flow both ways untouched -- the ``101`` is the sandbox server's own, extensions
such as permessage-deflate are negotiated end to end, and frames are not parsed twice. The
checks before that (exposed? token? wake the sandbox) are the gateway's own
(:meth:`.ports.Ports.serve`). Every other WebSocket goes to uvicorn's usual implementation.

Flow control both ways: the client's reads pause while the tunnel's write buffer is above
:data:`HIGH_WATER`, and the tunnel is not read while the client's transport is paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
from typing import Any, cast
from urllib.parse import unquote

from sandlot.server.tunnel import TunnelError, open_tunnel
from sandlot.server.upstream import AgentPool

log = logging.getLogger("sandlot.ports")

HIGH_WATER = 256 * 1024
READ_CHUNK = 65536
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
        self.upstream: asyncio.StreamWriter | None = None
        self.pending: list[bytes] = []
        self.client_eof = False
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.error_status = 0
        self.error_headers: list[tuple[bytes, bytes]] = []

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.task is None:  # the upgrade request's head, rebuilt by uvicorn
            self._start(bytes(data))
            return
        if self.upstream is None:
            self.pending.append(bytes(data))
            return
        self.upstream.write(data)
        self._throttle()

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.upstream is not None and self.upstream.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.upstream.write_eof()
        return True  # keep the other direction open

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self.can_write.set()
        if self.upstream is not None:
            self.upstream.close()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def shutdown(self) -> None:  # uvicorn's graceful shutdown
        if self.transport is not None:
            self.transport.close()

    # -- routing -------------------------------------------------------------------------------

    def _start(self, head: bytes) -> None:
        assert self.transport is not None
        ports = _ports_of(self.config)
        scope = _scope(head, self.transport) if ports is not None else None
        target = ports.match(scope) if ports is not None and scope is not None else None
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
            await ports.serve(target, scope, self._receive, self._send)
        except asyncio.CancelledError:
            pass
        except Exception:  # pragma: no cover - logged; the connection is closed below
            log.exception("WebSocket pass-through to %s failed", target.sandbox_id)
        finally:
            if self.transport is not None:
                self.transport.close()

    async def _receive(self) -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def _send(self, message: dict[str, Any]) -> None:
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
        assert self.transport is not None
        try:
            reader, writer = await open_tunnel(agent.address, agent.secret, fwd.port)
        except TunnelError as exc:
            data = json.dumps(fwd.bad_gateway(exc)).encode()
            await self._send(
                {
                    "type": "websocket.http.response.start",
                    "status": 502,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(data)).encode()),
                    ],
                }
            )
            await self._send({"type": "websocket.http.response.body", "body": data})
            return
        path = fwd.target_path(scope)
        if fwd.query:
            path += "?" + fwd.query
        head = [f"GET {path} HTTP/1.1\r\n".encode("latin-1")]
        for k, v in fwd.headers(scope, keep_upgrade=True):
            head.append(k + b": " + v + b"\r\n")
        head.append(b"\r\n")
        writer.write(b"".join(head))
        self.upstream = writer
        for data in self.pending:
            writer.write(data)
        self.pending.clear()
        if self.client_eof and writer.can_write_eof():
            writer.write_eof()
        self.transport.resume_reading()
        try:
            while data := await reader.read(READ_CHUNK):
                await self.can_write.wait()
                if self.transport.is_closing():
                    break
                self.transport.write(data)
            if self.transport.can_write_eof() and not self.transport.is_closing():
                self.transport.write_eof()
        except (OSError, RuntimeError):
            pass
        finally:
            writer.close()

    def _throttle(self) -> None:
        upstream, transport = self.upstream, self.transport
        if upstream is None or transport is None:
            return
        if upstream.transport.get_write_buffer_size() > HIGH_WATER:
            transport.pause_reading()

            async def resume() -> None:
                with contextlib.suppress(OSError, RuntimeError):
                    await upstream.drain()
                if not transport.is_closing():
                    transport.resume_reading()

            asyncio.get_running_loop().create_task(resume())


def _ports_of(config: Any) -> Any:
    app = getattr(config, "app", None)
    api = getattr(getattr(app, "state", None), "api", None)
    return getattr(api, "ports", None)


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


def ports_http_protocol() -> Any:
    """uvicorn's HTTP protocol class, extended: an ``Upgrade: h2c`` request aimed at an exposed
    port is handed to :class:`PortsWebSocketProtocol` (which passes it, and everything after,
    through as bytes) instead of being answered in HTTP/1.1; a connection that opens with the
    HTTP/2 preface is handed to :mod:`.h2serve` (see :func:`_h2_preface_hook`). Other requests
    are unchanged."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class PortsHttpToolsProtocol(HttpToolsProtocol):
        #: The connection's first bytes while they may still be the HTTP/2 preface; None once
        #: decided.
        _first_bytes: bytes | None = b""

        def data_received(self, data: bytes) -> None:
            if self._first_bytes is not None:
                data = _h2_preface_hook(self, self._first_bytes + data)
                if not data:
                    return
            super().data_received(data)

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
            return ports.match(scope) is not None

    return PortsHttpToolsProtocol


def _h2_preface_hook(protocol: Any, head: bytes) -> bytes:
    """HTTP/2 with prior knowledge on uvicorn's HTTP/1.1 protocol: while ``head`` (the
    connection's first bytes) may still become the preface, keep it and answer ``b""``; when it
    is the preface, hand the connection to :class:`.h2serve.H2ServerProtocol` (``b""``);
    otherwise it is HTTP/1.1, returned for uvicorn to parse."""
    from sandlot.server.h2serve import PREFACE, switch_to_h2

    if len(head) < len(PREFACE) and PREFACE.startswith(head):
        protocol._first_bytes = head
        return b""
    protocol._first_bytes = None
    if not head.startswith(PREFACE):
        return head
    protocol.connections.discard(protocol)
    protocol._unset_keepalive_if_required()
    switch_to_h2(
        protocol.config, protocol.server_state, protocol.app_state, protocol.transport, head
    )
    return b""
