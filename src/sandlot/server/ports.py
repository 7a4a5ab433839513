"""Exposed ports: the control API that exposes them, the gateway that serves them, and the TCP
proxy.

URL forms of an exposed port (both served by the server's own listener):

- path form, always: ``{server}/sandboxes/{id}/ports/{port}/{path}`` -- the prefix is stripped
  before the request reaches the sandbox (which sees ``/{path}``; ``X-Forwarded-Prefix`` says what
  was stripped). This is what ``expose_port()`` returns as ``exposed_at``.
- host form, when the server runs with ``--domain D``: ``http://{port}-{id}.D/{path}``, routed by
  the ``Host`` header, the path passed unchanged (apps with absolute links work here).

Every request reaches the sandbox through the agent's ``GET /tunnel`` (see :mod:`.tunnel`):
sandboxes have no network the host can reach. HTTP/1.1 requests and responses are streamed in
both directions with backpressure (keep-alive tunnels are pooled per sandbox and port); a
sandbox made with ``exposed_port_protocol="http2"`` is spoken to in h2c instead, one multiplexed
connection per port (:mod:`.h2upstream`), its trailers passed on to clients whose server offers
ASGI's trailers extension (HTTP/2 clients under ``sandlot server``, :mod:`.h2serve`);
WebSockets are relayed message by message (the client's handshake is replayed to the sandbox's
server, its subprotocol choice passed back). The whole exchange is lifecycle *activity*: it wakes a
sleeping sandbox and keeps it awake while a response streams or a WebSocket stays open.

Exposed URLs are public, as on Koyeb, unless the sandbox was created with ``protect_ports``:
then each exposed port has its own token, accepted as ``Authorization: Bearer <token>``, as a
``?sandlot_token=`` query parameter (in the host form, this also sets a cookie for that host, so
a browser can follow links), or as that cookie; the token is removed before the request reaches
the sandbox. The path form shares the server's origin among all sandboxes: for browsers, prefer
the host form (each port its own origin).

The TCP proxy (``enable_tcp_proxy``): a listener per sandbox on the server's host
(``--tcp-proxy-host``, 127.0.0.1 by default; the port is chosen by the system) relaying raw TCP
to the port bound with ``/bind_port``, as Koyeb's does. With several bound ports the first one
bound (the agent's ``GET /bound_ports`` order) is the target; each new connection reads it again.
It cannot be combined with ``protect_ports`` (refused at create): raw TCP has no place for a
port token, so the proxy would serve protected ports to anyone who reaches its address.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import socket
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, quote, urlencode

import anyio
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response

from sandlot.engines.base import AgentAddress
from sandlot.server import agentcalls
from sandlot.server.admission import Admission, Busy
from sandlot.server.asgi import (
    HOP_BY_HOP_REQUEST,
    HOP_BY_HOP_RESPONSE,
    ClientGone,
    chunked,
    refuse_websocket,
    request_body,
    response_headers,
    send_json,
    stream_response_body,
    until_client_gone,
)
from sandlot.server.control import API_TOKEN_PREFIX, LIVE_STATUSES, ApiError, Control
from sandlot.server.db import SandboxRow, utcnow
from sandlot.server.h2upstream import H2PortPool, H2Response
from sandlot.server.lifecycle import WakeError
from sandlot.server.relay import RelayError, Relays
from sandlot.server.tunnel import TunnelError, open_tunnel, open_tunnel_socket, wait_readable
from sandlot.server.upstream import AgentPool, UpstreamError, UpstreamResponse, _Conn

if TYPE_CHECKING:
    from sandlot.server.app import ServerConfig

log = logging.getLogger("sandlot.ports")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: How long a replica trusts its cached view of a sandbox's exposed ports (another replica may
#: have changed them); this replica's own changes apply at once.
EXPOSED_CACHE_TTL = 2.0
#: How long a request waits for the agent's view of its ports before using the stored one.
SYNC_TIMEOUT = 2.0
TOKEN_PARAM = "sandlot_token"
#: The largest WebSocket message relayed message by message (the fallback under other servers).
WS_MESSAGE_MAX = 16 * 1024 * 1024
TOKEN_COOKIE = "sandlot_port_token"
_PATH_FORM = re.compile(r"^/sandboxes/([A-Za-z0-9_-]{1,64})/ports/([^/]*)(/.*)?$")
_HOST_LABEL = re.compile(r"^(\d{1,5})-([a-z0-9_-]{1,64})$")
_DROP_REQUEST = HOP_BY_HOP_REQUEST | {
    b"expect",  # the server answers 100-continue itself when the body is read
    b"content-length",  # set again below
    b"x-forwarded-prefix",
}
#: (``date``: the server in front adds its own.)
_DROP_RESPONSE = HOP_BY_HOP_RESPONSE | {b"date"}
_TOKEN_PREFIX = API_TOKEN_PREFIX.encode()


# -- API bodies -----------------------------------------------------------------------------------


class ExposePort(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    port: StrictInt = Field(..., ge=1, le=65535)
    exclusive: StrictBool = Field(
        False,
        description="Koyeb's semantics: fail with 409 if another port is already exposed "
        "(default: sandlot's, several ports at once).",
    )


class ExposedPortOut(BaseModel):
    port: int
    exposed_at: str = Field(..., description="Path form URL: {server}/sandboxes/{id}/ports/{port}/")
    host_url: str | None = Field(
        None, description="Host form URL ({port}-{id}.{domain}) when the server has --domain."
    )
    protocol: str
    token: str | None = Field(None, description="With protect_ports: this port's token.")
    since: str


class TcpProxyOut(BaseModel):
    host: str
    port: int


class PortsOut(BaseModel):
    ports: list[ExposedPortOut]
    tcp_proxy: TcpProxyOut | None = None
    domain: str = Field(..., description="Where ports are served: the wildcard domain or server.")


class UnexposedOut(BaseModel):
    unexposed: list[int]
    ports: list[int]


# -- helpers ------------------------------------------------------------------------------------


def _port_number(text: str) -> int | None:
    """A port number written in ASCII digits (``int()`` also takes '٣' and raises on '²')."""
    if re.fullmatch(r"[0-9]{1,5}", text) and 1 <= int(text) <= 65535:
        return int(text)
    return None


def _close_gently(conn: socket.socket) -> None:
    """Close with a FIN, not a reset: what the client already sent is read and dropped first
    (closing a socket with unread data makes the kernel answer RST)."""
    if conn.fileno() < 0:
        return
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        while conn.recv(65536):
            pass
    conn.close()


class _HangupWatch:
    """Call ``on_gone`` once the client closes its side or the connection fails; nothing it
    sent is consumed, and a client that speaks first is there (the watch then ends).

    It runs as the event loop's reader callback, not as a task, so that :meth:`stop` takes the
    reader off at once and the socket can be closed or handed on right after. A task waiting
    for readability takes its reader off only when it next runs; a socket closed before that
    leaves a stale selector entry under its descriptor's number, and the next socket given that
    number (a new TCP proxy listener) registers into the stale entry without reaching epoll:
    its readiness is never seen and its connections wait in the backlog for ever."""

    def __init__(self, conn: socket.socket, on_gone: Callable[[], None]) -> None:
        self._conn = conn
        self._on_gone = on_gone
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = conn.fileno()
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            spoke = bool(self._conn.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return
        except OSError:
            spoke = False
        self.stop()
        if not spoke:
            self._on_gone()

    def stop(self) -> None:
        """Stop watching (idempotent); call it before the socket is closed or handed on."""
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return bytes(v)
    return None


class _PortPool(AgentPool):
    """Keep-alive HTTP/1.1 connections to one port in one sandbox, each a tunnel through the
    agent: the gateway's agent client (request writing, response parsing, pooling) reused."""

    def __init__(self, address: AgentAddress, secret: bytes | None, port: int) -> None:
        super().__init__(address, secret)
        self.port = port

    async def _connect(self) -> _Conn:
        reader, writer = await open_tunnel(self.address, self.secret, self.port)
        return _Conn(reader, writer)


@dataclass
class _TcpProxy:
    listener: socket.socket
    accepting: asyncio.Task[None]


@dataclass
class _Exposed:
    ports: dict[int, dict[str, Any]]
    protocol: str
    checked_at: float


@dataclass
class _Target:
    sandbox_id: str
    port_text: str
    path: str
    #: What the path form strips ("" for the host form).
    prefix: str


class Ports:
    """Exposed ports of every sandbox: state, API handlers, gateway and TCP proxies."""

    def __init__(
        self,
        config: ServerConfig,
        control: Control,
        principal: Callable[[Request], Awaitable[Any]],
    ) -> None:
        self.config = config
        self.control = control
        self.principal = principal
        domain = (config.domain or "").strip().lower().strip(".")
        self.domain = domain or None
        self._domain_host = domain.rsplit(":", 1)[0] if domain else ""
        self._exposed: dict[str, _Exposed] = {}
        self._pools: dict[tuple[str, int], _PortPool | H2PortPool] = {}
        self._proxies: dict[str, _TcpProxy] = {}
        self._proxy_locks: dict[str, asyncio.Lock] = {}
        self._proxy_tasks: set[asyncio.Task[None]] = set()
        #: Long-lived byte streams (WebSockets, h2c, TCP proxy) are copied by these processes.
        self.relays = Relays()
        #: The agent (pool) each sandbox's ports were last pushed to (see :meth:`_sync`).
        self._synced: dict[str, AgentPool] = {}
        self.limits = config.port_limits
        #: Requests in flight per (sandbox, port): see :mod:`.admission`.
        self._slots: dict[tuple[str, int], Admission] = {}
        #: TCP proxy connections open per sandbox.
        self._tcp_open: dict[str, int] = {}

    # -- state ----------------------------------------------------------------------------------

    def _read(self, sandbox_id: str) -> SandboxRow | None:
        row: SandboxRow | None = self.control.store.get_sandbox(sandbox_id)
        return row

    def _change(self, sandbox_id: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read-modify-write of a sandbox's exposed ports, under the row's lock."""
        with self.control.store.session() as s, s.begin():
            row = s.scalars(
                select(SandboxRow).where(SandboxRow.id == sandbox_id).with_for_update()
            ).first()
            if row is None:
                return {}
            ports = dict(row.exposed_ports or {})
            change(ports)
            row.exposed_ports = ports
            row.updated_at = utcnow()
            return ports

    async def exposed(self, sandbox_id: str) -> _Exposed | None:
        """The sandbox's exposed ports (cached briefly); None if there is no such sandbox."""
        entry = self._exposed.get(sandbox_id)
        now = time.monotonic()
        if (
            entry is not None
            and now - entry.checked_at < EXPOSED_CACHE_TTL
            and not self._agent_changed(sandbox_id)
        ):
            return entry
        row = await self.control.db(self._read, sandbox_id)
        if row is None or row.status not in LIVE_STATUSES:
            self._forget(sandbox_id)
            return None
        ports = dict(row.exposed_ports or {})
        if row.status == "running":  # never ask a sleeping (perhaps frozen) agent
            ports = await self._sync(row, ports)
        token = self.control.store.port_token
        entry = _Exposed(
            # the tokens are derived (or opened) here, once per cache refresh
            {int(p): {**v, "token": token(row.id, int(p), v)} for p, v in ports.items()},
            row.exposed_port_protocol or "http",
            now,
        )
        self._exposed[sandbox_id] = entry
        return entry

    async def _agent(self, sandbox_id: str) -> AgentPool | None:
        """The sandbox's agent pool, with its secret (the tunnel needs it)."""
        return await self.control.agent_for(sandbox_id)

    def _agent_changed(self, sandbox_id: str) -> bool:
        current = self.control._agents.get(sandbox_id)
        return current is not None and current.pool is not self._synced.get(sandbox_id)

    async def _sync(self, row: SandboxRow, ports: dict[str, Any]) -> dict[str, Any]:
        """Keep the agent's bound ports and the database in step. A new agent (the sandbox woke
        from deep sleep, or this server restarted) gets the stored ports bound again; otherwise
        the agent is the truth: a port bound or unbound there directly (Koyeb's SDK calls
        ``/bind_port`` through the agent gateway) is exposed or unexposed here too."""
        agent = await self._agent(row.id)
        if agent is None:
            return ports
        try:
            with anyio.fail_after(SYNC_TIMEOUT):  # all of it: one call per stored port
                if self._synced.get(row.id) is not agent:
                    ok = True
                    for port in sorted(ports, key=lambda p: str(ports[p].get("since", ""))):
                        body = {"port": port, "multi": True}
                        status, _ = await agentcalls.call(agent, "POST", "/bind_port", body)
                        ok = ok and status == 200
                    if ok:
                        self._synced[row.id] = agent
                    return ports
                status, answer = await agentcalls.call(agent, "GET", "/bound_ports")
            if status != 200:
                return ports
            listed = agentcalls.validate(agentcalls.BoundPorts, answer, "/bound_ports")
        except (UpstreamError, TimeoutError) as exc:
            log.info("ports of %s: no usable answer from the agent (%s)", row.id, exc)
            return ports
        bound = [str(p) for p in dict.fromkeys(listed.ports)]
        # The agent's word counts only up to the limit (it runs inside the sandbox).
        room = max(0, self.limits.max_exposed - len([p for p in ports if p in bound]))
        added = [p for p in bound if p not in ports][:room]
        removed = [p for p in ports if p not in bound]
        if not added and not removed:
            return ports
        protect = bool(row.protect_ports)

        def change(current: dict[str, Any]) -> None:
            for p in removed:
                current.pop(p, None)
            for p in added:
                current.setdefault(p, _new_port_info(protect))

        result: dict[str, Any] = await self.control.db(self._change, row.id, change)
        for p in removed:
            self._closed_port(row.id, int(p))
        return result

    def _closed_port(self, sandbox_id: str, port: int) -> None:
        """A port is no longer exposed: its pooled connections and its open relayed ones
        (WebSockets, TCP proxy connections) end now, not when their clients leave."""
        pool = self._pools.pop((sandbox_id, port), None)
        if pool is not None:
            pool.close()
        self._slots.pop((sandbox_id, port), None)
        self.relays.close_tagged((sandbox_id, port))

    def _forget(self, sandbox_id: str) -> None:
        self._exposed.pop(sandbox_id, None)
        self._synced.pop(sandbox_id, None)
        for key in [k for k in self._pools if k[0] == sandbox_id]:
            self._pools.pop(key).close()
        for key in [k for k in self._slots if k[0] == sandbox_id]:
            del self._slots[key]

    def _pool(
        self, sandbox_id: str, agent: AgentPool, port: int, protocol: str
    ) -> _PortPool | H2PortPool:
        """The port's keep-alive HTTP/1.1 pool, or its HTTP/2 connection when the sandbox was
        created with ``exposed_port_protocol="http2"``."""
        kind = H2PortPool if protocol == "http2" else _PortPool
        pool = self._pools.get((sandbox_id, port))
        if (
            pool is None
            or not isinstance(pool, kind)
            or pool.address != agent.address
            or pool.secret != agent.secret
        ):
            if pool is not None:
                pool.close()
            pool = kind(agent.address, agent.secret, port)
            self._pools[(sandbox_id, port)] = pool
        return pool

    # -- URLs -----------------------------------------------------------------------------------

    def path_url(self, base: str, sandbox_id: str, port: int) -> str:
        return f"{base}/sandboxes/{sandbox_id}/ports/{port}/"

    def host_url(self, base: str, sandbox_id: str, port: int) -> str | None:
        if self.domain is None:
            return None
        scheme = "https" if base.startswith("https:") else "http"
        return f"{scheme}://{port}-{sandbox_id}.{self.domain}/"

    def domain_for(self, base: str) -> str:
        return self.domain or base.split("://", 1)[-1]

    def _out(self, base: str, row_id: str, port: int, info: dict[str, Any], protocol: str) -> Any:
        return ExposedPortOut(
            port=port,
            exposed_at=self.path_url(base, row_id, port),
            host_url=self.host_url(base, row_id, port),
            protocol=protocol,
            token=self.control.store.port_token(row_id, port, info),
            since=str(info.get("since", "")),
        )

    # -- control API ----------------------------------------------------------------------------

    async def _live_row(self, request: Request) -> SandboxRow:
        who = await self.principal(request)
        row: SandboxRow = await self.control.get(who.project, request.path_params["sandbox_id"])
        if row.status not in ("running", "sleeping"):
            raise ApiError(409, "not_running", f"sandbox {row.id} is {row.status}")
        return row

    @typing.overload
    async def _agent_call(
        self, sandbox_id: str, route: Literal["/bound_ports"], body: None
    ) -> tuple[int, agentcalls.BoundPorts]: ...

    @typing.overload
    async def _agent_call(
        self, sandbox_id: str, route: str, body: dict[str, Any]
    ) -> tuple[int, agentcalls.AgentReply]: ...

    async def _agent_call(
        self, sandbox_id: str, route: str, body: dict[str, Any] | None
    ) -> tuple[int, agentcalls.BoundPorts | agentcalls.AgentReply]:
        """A JSON call to the sandbox's agent (waking it if needed): (status, answer), the
        answer validated (``/bound_ports`` when it is a 200: its ports; else its message)."""
        async with self.control.lifecycle.activity(sandbox_id):
            agent = await self._agent(sandbox_id)
            if agent is None:
                raise ApiError(404, "not_found", f"sandbox {sandbox_id} not found")
            method = "GET" if route == "/bound_ports" else "POST"
            try:
                status, answer = await agentcalls.call(agent, method, route, body)
                if route == "/bound_ports" and status == 200:
                    return status, agentcalls.validate(agentcalls.BoundPorts, answer, route)
                return status, agentcalls.validate(agentcalls.AgentReply, answer, route)
            except UpstreamError as exc:
                raise ApiError(
                    502, "agent_unreachable", f"sandbox {sandbox_id}'s agent: {exc}"
                ) from exc

    async def expose(self, request: Request) -> Response:
        from sandlot.server.app import _public_base, json_response, parse_body

        row = await self._live_row(request)
        req: ExposePort = await parse_body(request, ExposePort)
        self._check_room(row.id, row.exposed_ports or {}, req.port)
        status, answer = await self._agent_call(
            row.id, "/bind_port", {"port": str(req.port), "multi": not req.exclusive}
        )
        if status == 409:
            current = answer.current_port
            return Response(
                json.dumps(
                    {
                        "success": False,
                        "error": f"Port already bound: port {current} is exposed "
                        f"(unexpose it first, or expose without exclusive)",
                        "code": "port_conflict",
                        "current_port": current,
                    }
                ),
                status_code=409,
                media_type="application/json",
            )
        if status != 200:
            raise ApiError(502, "agent_error", f"binding port {req.port}: {answer.message(status)}")
        protect = bool(row.protect_ports)

        full: list[ApiError] = []

        def add(ports: dict[str, Any]) -> None:
            try:  # again under the row's lock: two exposes at once must not both fit
                self._check_room(row.id, ports, req.port)
            except ApiError as exc:
                full.append(exc)
                return
            ports[str(req.port)] = ports.get(str(req.port)) or _new_port_info(protect)

        ports = await self.control.db(self._change, row.id, add)
        if full:
            await self._agent_call(row.id, "/unbind_port", {"port": str(req.port)})
            raise full[0]
        self._exposed.pop(row.id, None)
        base = _public_base(request, self.config)
        info = ports.get(str(req.port), {})
        return json_response(self._out(base, row.id, req.port, info, row.exposed_port_protocol))

    def _check_room(self, sandbox_id: str, ports: dict[str, Any], port: int) -> None:
        limit = self.limits.max_exposed
        if str(port) not in ports and len(ports) >= limit:
            raise ApiError(
                409,
                "too_many_ports",
                f"sandbox {sandbox_id} already has {len(ports)} exposed ports, the limit "
                f"(sandlot server --max-exposed-ports {limit}); unexpose one first",
            )

    async def unexpose(self, request: Request) -> Response:
        from sandlot.server.app import json_response

        row = await self._live_row(request)
        raw = request.query_params.get("port")
        port: int | None = None
        if raw is not None:
            port = _port_number(raw)
            if port is None:
                raise ApiError(400, "invalid_port", f"port must be 1-65535, not {raw[:20]!r}")
            if str(port) not in (row.exposed_ports or {}):
                raise ApiError(
                    404, "port_not_exposed", f"port {port} is not exposed on sandbox {row.id}"
                )
        status, answer = await self._agent_call(
            row.id, "/unbind_port", {"port": str(port)} if port is not None else {"port": ""}
        )
        if status != 200:
            raise ApiError(502, "agent_error", f"unbinding: {answer.message(status)}")
        removed: list[int] = []

        def drop(ports: dict[str, Any]) -> None:
            for p in list(ports):
                if port is None or p == str(port):
                    del ports[p]
                    removed.append(int(p))

        ports = await self.control.db(self._change, row.id, drop)
        self._exposed.pop(row.id, None)
        for p in removed:
            self._closed_port(row.id, p)
        return json_response(UnexposedOut(unexposed=sorted(removed), ports=sorted(map(int, ports))))

    async def list_ports(self, request: Request) -> Response:
        from sandlot.server.app import _public_base, json_response

        who = await self.principal(request)
        row: SandboxRow = await self.control.get(who.project, request.path_params["sandbox_id"])
        base = _public_base(request, self.config)
        ports = sorted((int(p), v) for p, v in (row.exposed_ports or {}).items())
        proxy = None
        awake_or_asleep = row.status in ("running", "sleeping")
        if row.enable_tcp_proxy and not row.protect_ports and awake_or_asleep:
            listener = await self.ensure_tcp_proxy(row.id)
            host, port = listener.getsockname()[:2]
            proxy = TcpProxyOut(host=host, port=port)
        return json_response(
            PortsOut(
                ports=[self._out(base, row.id, p, v, row.exposed_port_protocol) for p, v in ports],
                tcp_proxy=proxy,
                domain=self.domain_for(base),
            )
        )

    async def after_create(self, row: SandboxRow, protect_ports: bool, tcp_proxy: bool) -> Any:
        """Options a warm-pool claim does not carry, and the TCP proxy's listener."""
        if bool(row.protect_ports) != protect_ports or row.enable_tcp_proxy != tcp_proxy:
            row = await self.control.db(
                self.control.store.update_sandbox,
                row.id,
                protect_ports=protect_ports,
                enable_tcp_proxy=tcp_proxy,
            )
        if tcp_proxy and not protect_ports:
            await self.ensure_tcp_proxy(row.id)
        return row

    # -- the gateway ------------------------------------------------------------------------------

    def match(self, scope: Scope) -> _Target | None:
        if self.domain is not None:
            host = (_header(scope, b"host") or b"").decode("latin-1").lower()
            host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host.endswith("." + self._domain_host):
                label = _HOST_LABEL.match(host[: -len(self._domain_host) - 1])
                if label is not None:
                    return _Target(label.group(2), label.group(1), scope["path"], "")
        found = _PATH_FORM.match(scope["path"])
        if found is None:
            return None
        sandbox_id, port_text, rest = found.groups()
        prefix = f"/sandboxes/{sandbox_id}/ports/{port_text}"
        return _Target(sandbox_id, port_text, rest or "", prefix)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """Wrap the server's app: port URLs are answered here, everything else goes on."""

        async def ports_router(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] in ("http", "websocket"):
                target = self.match(scope)
                if target is not None:
                    await self.serve(target, scope, receive, send)
                    return
            await app(scope, receive, send)

        return ports_router

    async def serve(self, target: _Target, scope: Scope, receive: Receive, send: Send) -> None:
        is_ws = scope["type"] == "websocket"

        async def refuse(status: int, code: str, message: str, **extra: Any) -> None:
            body = {"error": message, "code": code, **extra}
            if is_ws:
                await refuse_websocket(scope, send, status, body)
            else:
                await send_json(send, status, body)

        text = target.port_text
        port = _port_number(text)
        if port is None:
            await refuse(404, "port_not_exposed", f"{text[:20]!r} is not a port (1-65535)")
            return
        exposed = await self.exposed(target.sandbox_id)
        if exposed is None:
            await refuse(404, "not_found", f"sandbox {target.sandbox_id} not found")
            return
        info = exposed.ports.get(port)
        if info is None:
            await refuse(
                404,
                "port_not_exposed",
                f"port {port} is not exposed on sandbox {target.sandbox_id}",
                port=port,
            )
            return
        if target.prefix and not target.path:
            if is_ws:
                target.path = "/"
            else:  # /sandboxes/ID/ports/8080 → .../8080/ (relative links resolve below it)
                location = target.prefix + "/"
                if scope.get("query_string"):
                    location += "?" + scope["query_string"].decode("latin-1")
                await send(
                    {
                        "type": "http.response.start",
                        "status": 307,
                        "headers": [(b"location", location.encode()), (b"content-length", b"0")],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return
        token = info.get("token")
        query = scope.get("query_string", b"").decode("latin-1")
        set_cookie: bytes | None = None
        if token:
            given, query, from_query = _given_token(scope, query)
            if given is None or not hmac.compare_digest(given.encode(), token.encode()):
                await refuse(
                    401,
                    "unauthorized",
                    f"port {port} of sandbox {target.sandbox_id} is protected: pass its token "
                    f"as 'Authorization: Bearer <token>' or ?{TOKEN_PARAM}=<token>",
                    port=port,
                )
                return
            if from_query and not target.prefix:
                # Host form only: there each port is its own origin. In the path form every
                # sandbox shares the server's origin, and a page of another sandbox could make
                # the browser send this cookie (and read the answer).
                set_cookie = f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax".encode()
        try:
            async with self.control.lifecycle.activity(target.sandbox_id):
                agent = await self._agent(target.sandbox_id)
                if agent is None:
                    await refuse(404, "not_found", f"sandbox {target.sandbox_id} not found")
                    return
                forward = _Forward(target, port, query, bool(token), set_cookie)
                raw = (scope.get("extensions") or {}).get("sandlot.raw_tunnel")
                if is_ws and raw is not None:  # sandlot's runner: bytes both ways (wsraw.py)
                    await raw["run"](agent, forward, scope)
                elif is_ws:
                    await self._websocket(agent, forward, scope, receive, send)
                else:
                    pool = self._pool(target.sandbox_id, agent, port, exposed.protocol)
                    async with self._port_slots(target.sandbox_id, port).slot():
                        await self._http(pool, forward, scope, receive, send)
        except WakeError as exc:
            await refuse(503, "wake_failed", str(exc))
        except Busy as exc:
            await refuse(
                503,
                "port_busy",
                f"port {port} of sandbox {target.sandbox_id} is busy: {exc} (limit "
                f"{self.limits.max_requests} at once, sandlot server --max-port-requests)",
                port=port,
            )

    def _port_slots(self, sandbox_id: str, port: int) -> Admission:
        slots = self._slots.get((sandbox_id, port))
        if slots is None:
            lim = self.limits
            slots = Admission(lim.max_requests, lim.max_queued, lim.queue_timeout)
            self._slots[(sandbox_id, port)] = slots
        return slots

    async def _http(
        self,
        pool: _PortPool | H2PortPool,
        fwd: _Forward,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        headers = fwd.headers(scope)
        h2 = isinstance(pool, H2PortPool)
        if h2 and (_header(scope, b"te") or b"").strip().lower() == b"trailers":
            headers.append((b"te", b"trailers"))  # what gRPC servers insist on
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        body_done = asyncio.Event()
        content: bytes | AsyncIterator[bytes]
        length = _header(scope, b"content-length")
        if not first.get("more_body", False):
            content = first.get("body", b"")
            body_done.set()
        elif length is not None:
            headers.append((b"content-length", length))
            content = request_body(first, receive, body_done)
        elif h2:  # HTTP/2 frames the body itself
            content = request_body(first, receive, body_done)
        else:  # a chunked upload stays chunked (streamed, never gathered)
            headers.append((b"transfer-encoding", b"chunked"))
            content = chunked(request_body(first, receive, body_done))
        target = fwd.target_path(scope)
        if fwd.query:
            target += "?" + fwd.query
        # The client leaving cancels the exchange, which closes the tunnel: that is how the
        # sandbox's server learns it (an idle stream would otherwise hold it forever).
        trailers = "http.response.trailers" in (scope.get("extensions") or {})
        await until_client_gone(
            receive,
            body_done,
            self._exchange(pool, fwd, scope["method"], target, headers, content, send, trailers),
        )

    async def _exchange(
        self,
        pool: _PortPool | H2PortPool,
        fwd: _Forward,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        content: bytes | AsyncIterator[bytes],
        send: Send,
        trailers: bool = False,
    ) -> None:
        """One request to the port and its response streamed back. With ``trailers`` (the
        client's server offers ASGI's trailers extension) and an HTTP/2 port, the response's
        trailers are passed on (gRPC's status travels there)."""
        try:
            upstream: UpstreamResponse | H2Response = await pool.request(
                method, target, headers, content
            )
        except ClientGone:
            return
        except UpstreamError as exc:
            await send_json(send, 502, fwd.bad_gateway(exc))
            return
        try:
            out = response_headers(upstream.headers, _DROP_RESPONSE)
            if fwd.set_cookie is not None:
                out.append((b"set-cookie", fwd.set_cookie))
            with_trailers = trailers and isinstance(upstream, H2Response)
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status,
                    "headers": out,
                    "trailers": with_trailers,
                }
            )
            # A server that breaks off mid-response: the error propagates and the connection is
            # aborted, so the client sees a truncated response, not one that passes for whole.
            await stream_response_body(
                send,
                upstream.iter_body(),
                lambda: isinstance(upstream, UpstreamResponse) and upstream.last_chunk_out,
            )
            if with_trailers:
                tail = upstream.trailers if isinstance(upstream, H2Response) else []
                await send(
                    {"type": "http.response.trailers", "headers": tail, "more_trailers": False}
                )
        finally:
            upstream.close()

    async def _websocket(
        self, agent: AgentPool, fwd: _Forward, scope: Scope, receive: Receive, send: Send
    ) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.typing import Origin, Subprotocol

        message = await receive()
        if message["type"] != "websocket.connect":
            return
        try:
            sock = await open_tunnel_socket(agent.address, agent.secret, fwd.port)
        except TunnelError as exc:
            await refuse_websocket(scope, send, 502, fwd.bad_gateway(exc))
            return
        host = (_header(scope, b"host") or b"sandbox").decode("latin-1")
        if not re.fullmatch(r"[A-Za-z0-9.:\[\]_-]{1,255}", host):
            host = "sandbox"
        path = fwd.target_path(scope)
        if fwd.query:
            path += "?" + fwd.query
        keep = {b"cookie", b"authorization", b"user-agent", b"accept-language"}
        extra = [(k.decode(), v.decode("latin-1")) for k, v in fwd.headers(scope) if k in keep]
        origin = _header(scope, b"origin")
        try:
            upstream = await connect(
                f"ws://{host}{path}",
                sock=sock,
                unix=sock.family == socket.AF_UNIX,
                origin=Origin(origin.decode("latin-1")) if origin else None,
                subprotocols=[Subprotocol(p) for p in scope.get("subprotocols") or []],
                additional_headers=extra,
                user_agent_header=None,
                compression=None,
                # What the sandbox's server sends is held whole per message here: bounded like
                # uvicorn bounds the client's side (16 MiB; larger: closed with 1009).
                max_size=WS_MESSAGE_MAX,
                ping_interval=None,
                proxy=None,
                open_timeout=10,
            )
        except InvalidStatus as exc:
            sock.close()
            await refuse_websocket(
                scope,
                send,
                exc.response.status_code,
                {
                    "error": f"port {fwd.port}: the sandbox's server refused the WebSocket "
                    f"(HTTP {exc.response.status_code})",
                    "code": "websocket_refused",
                    "port": fwd.port,
                },
            )
            return
        except (InvalidHandshake, OSError, TimeoutError) as exc:
            sock.close()
            await refuse_websocket(scope, send, 502, fwd.bad_gateway(exc))
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        async with upstream, anyio.create_task_group() as tg:

            async def client_to_sandbox() -> None:
                while True:
                    msg = await receive()
                    if msg["type"] == "websocket.disconnect":
                        with contextlib.suppress(ConnectionClosed):
                            await upstream.close(code=_close_code(msg.get("code", 1000)))
                        break
                    if msg.get("bytes") is not None:
                        await upstream.send(msg["bytes"])
                    elif msg.get("text") is not None:
                        await upstream.send(msg["text"])
                tg.cancel_scope.cancel()

            async def sandbox_to_client() -> None:
                try:
                    async for data in upstream:
                        if isinstance(data, bytes):
                            await send({"type": "websocket.send", "bytes": data})
                        else:
                            await send({"type": "websocket.send", "text": data})
                except ConnectionClosed:
                    pass
                code = upstream.close_code or 1000
                with contextlib.suppress(OSError, RuntimeError):
                    await send({"type": "websocket.close", "code": _close_code(code)})
                tg.cancel_scope.cancel()

            tg.start_soon(client_to_sandbox)
            tg.start_soon(sandbox_to_client)

    # -- TCP proxy ------------------------------------------------------------------------------

    async def ensure_tcp_proxy(self, sandbox_id: str) -> socket.socket:
        """The sandbox's TCP proxy listener (made if it is not there yet)."""
        lock = self._proxy_locks.setdefault(sandbox_id, asyncio.Lock())
        async with lock:
            proxy = self._proxies.get(sandbox_id)
            if proxy is not None:
                return proxy.listener
            listener = socket.create_server((self.config.tcp_proxy_host, 0), backlog=512)
            listener.setblocking(False)
            accepting = asyncio.get_running_loop().create_task(
                self._accept_tcp(sandbox_id, listener)
            )
            # closed once the task is over, so never while its reader is registered
            accepting.add_done_callback(lambda _: listener.close())
            self._proxies[sandbox_id] = _TcpProxy(listener, accepting)
            log.info("TCP proxy of sandbox %s on %s", sandbox_id, listener.getsockname()[:2])
            return listener

    async def _accept_tcp(self, sandbox_id: str, listener: socket.socket) -> None:
        """Accept by hand rather than with ``asyncio.start_server``: nothing of a connection is
        read here, so the whole stream goes to the relay untouched. Not with
        ``loop.sock_accept`` either: a cancelled one takes its reader off only later, by the
        descriptor's number, which by then may name the next listener (the listener is closed
        when this task is done, see :meth:`ensure_tcp_proxy`)."""
        while True:
            await wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:  # EMFILE and the like: the listener stays, retry shortly
                log.warning("TCP proxy of %s: accept failed: %s", sandbox_id, exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = asyncio.get_running_loop().create_task(self._tcp_connection(sandbox_id, conn))
            self._proxy_tasks.add(task)
            task.add_done_callback(self._proxy_tasks.discard)

    async def _tcp_connection(self, sandbox_id: str, conn: socket.socket) -> None:
        """One TCP proxy connection, if the sandbox has fewer than ``max_tcp_connections``
        open (else it is closed at once)."""
        open_now = self._tcp_open.get(sandbox_id, 0)
        if open_now >= self.limits.max_tcp_connections:
            log.info("TCP proxy of %s: %d connections open, the limit", sandbox_id, open_now)
            _close_gently(conn)
            return
        self._tcp_open[sandbox_id] = open_now + 1
        try:
            await self._tcp_relay(sandbox_id, conn)
        finally:
            left = self._tcp_open.pop(sandbox_id, 1) - 1
            if left:
                self._tcp_open[sandbox_id] = left

    async def _tcp_relay(self, sandbox_id: str, conn: socket.socket) -> None:
        """Reach the sandbox's port, then hand both sockets to a relay. Until the hand-over the
        client is watched: one that leaves (or a way in that takes longer than
        ``tcp_connect_timeout``: a frozen agent, a port whose backlog is full) ends the attempt
        and the socket is closed at once -- such connections used to wait, in CLOSE_WAIT, for
        as long as the sandbox did not answer."""
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        assert task is not None
        left = False

        def gone() -> None:
            nonlocal left
            left = True
            task.cancel()

        watch = _HangupWatch(conn, gone)
        try:
            async with (
                asyncio.timeout(self.limits.tcp_connect_timeout) as deadline,
                self.control.lifecycle.activity(sandbox_id),
            ):
                agent = await self._agent(sandbox_id)
                if agent is None:
                    return
                await self.exposed(sandbox_id)  # a new agent gets the stored ports bound again
                status, answer = await self._agent_call(sandbox_id, "/bound_ports", None)
                if status != 200 or not answer.ports:
                    log.info("TCP proxy of %s: no port bound, connection closed", sandbox_id)
                    return
                port = answer.ports[0]
                upstream = await open_tunnel_socket(agent.address, agent.secret, port)
                watch.stop()
                deadline.reschedule(None)
                await self.relays.splice(conn, upstream, (sandbox_id, port))  # takes both
        except (TunnelError, ApiError, WakeError, RelayError, OSError) as exc:
            log.info("TCP proxy of %s: %s", sandbox_id, exc)
        except TimeoutError:
            log.info(
                "TCP proxy of %s: no way into the sandbox within %gs, connection closed",
                sandbox_id,
                self.limits.tcp_connect_timeout,
            )
        except asyncio.CancelledError:
            if not left or task.uncancel() > 0:
                raise
        finally:
            watch.stop()
            _close_gently(conn)

    async def _close_proxy(self, sandbox_id: str) -> None:
        proxy = self._proxies.pop(sandbox_id, None)
        self._proxy_locks.pop(sandbox_id, None)
        if proxy is not None:
            proxy.accepting.cancel()  # which closes the listener (see ensure_tcp_proxy)

    async def run(self, interval: float = 1.0) -> None:
        """Keep TCP proxies in step with the database: a listener for every live sandbox that
        asked for one (also after a restart or a warm-pool claim), none for the others."""
        await self.relays.warm_up()
        while True:
            try:
                rows = await self.control.db(
                    self.control.store.sandboxes_with_status, ["running", "sleeping"]
                )
                # Never for protected ports (refused at create; rows from before are skipped).
                wanted = {r.id for r in rows if r.enable_tcp_proxy and not r.protect_ports}
                for sandbox_id in list(self._proxies):
                    if sandbox_id not in wanted:
                        await self._close_proxy(sandbox_id)
                for sandbox_id in wanted - set(self._proxies):
                    await self.ensure_tcp_proxy(sandbox_id)
                live = {r.id for r in rows}
                for sandbox_id in list(self._exposed):
                    if sandbox_id not in live:
                        self._forget(sandbox_id)
            except Exception:  # pragma: no cover - logged; the loop must go on
                log.exception("ports check failed")
            await anyio.sleep(interval)

    async def close(self) -> None:
        for sandbox_id in list(self._proxies):
            await self._close_proxy(sandbox_id)
        for task in list(self._proxy_tasks):
            task.cancel()
        await self.relays.close()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


@dataclass
class _Forward:
    """One request's way to a port: what to strip and add."""

    target: _Target
    port: int
    query: str
    protected: bool
    set_cookie: bytes | None

    def headers(self, scope: Scope, keep_upgrade: bool = False) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        for k, v in scope["headers"]:
            if k in _DROP_REQUEST and not (keep_upgrade and k in (b"connection", b"upgrade")):
                continue
            if k == b"authorization":
                value = v[7:].strip()
                # Never pass an API token into a sandbox, nor the port's own token.
                if value.startswith(_TOKEN_PREFIX) or self.protected:
                    continue
            if k == b"cookie":  # the port token's cookie is the gateway's, never the app's
                _, v = _token_cookie(v)
                if not v:
                    continue
            out.append((k, v))
        client = scope.get("client")
        if client:
            out.append((b"x-forwarded-for", str(client[0]).encode()))
        secure = scope.get("scheme") in ("https", "wss")
        out.append((b"x-forwarded-proto", b"https" if secure else b"http"))
        if self.target.prefix:
            out.append((b"x-forwarded-prefix", self.target.prefix.encode()))
        return out

    def target_path(self, scope: Scope) -> str:
        """The path for the sandbox, as the client encoded it (``%2F`` stays ``%2F``)."""
        raw = scope.get("raw_path")
        prefix = self.target.prefix.encode()
        if isinstance(raw, bytes) and raw.startswith(prefix):
            rest = raw[len(prefix) :].split(b"?", 1)[0]
            if rest.startswith(b"/"):
                return rest.decode("latin-1")
        return quote(self.target.path or "/", safe="/%:@!$&'()*+,;=-._~")

    def bad_gateway(self, exc: Exception) -> dict[str, Any]:
        status = getattr(exc, "status", None)
        if status == 502:
            message = (
                f"nothing is listening on port {self.port} in sandbox {self.target.sandbox_id} "
                f"({exc})"
            )
        else:
            message = f"port {self.port} of sandbox {self.target.sandbox_id}: {exc}"
        return {"error": message, "code": "bad_gateway", "port": self.port}


def _new_port_info(protect: bool) -> dict[str, Any]:
    """A newly exposed port; a protected one's token is derived from the server key, the
    sandbox, the port and ``since`` (so exposing it again gives a new token)."""
    return {"since": utcnow().isoformat(), "protected": protect}


def _given_token(scope: Scope, query: str) -> tuple[str | None, str, bool]:
    """The port token the client gave (header, query or cookie), the query without it, and
    whether it came from the query."""
    auth = _header(scope, b"authorization")
    if auth is not None and auth[:7].lower() == b"bearer ":
        return auth[7:].strip().decode("latin-1"), query, False
    if TOKEN_PARAM in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        given = next((v for k, v in pairs if k == TOKEN_PARAM), None)
        rest = urlencode([(k, v) for k, v in pairs if k != TOKEN_PARAM])
        return given, rest, True
    for k, v in scope["headers"]:
        if k == b"cookie":
            token, _ = _token_cookie(v)
            if token is not None:
                return token, query, False
    return None, query, False


def _token_cookie(value: bytes) -> tuple[str | None, bytes]:
    """The port token's cookie in a ``Cookie`` header, and the header without it. One parser
    for both, so that whatever is taken as the token is also what is removed (a lenient
    cookie parser once read ``sandlot_port_token =T`` that the stripping did not match)."""
    token: str | None = None
    kept: list[bytes] = []
    for part in value.split(b";"):
        name, _, rest = part.partition(b"=")
        if name.strip() == TOKEN_COOKIE.encode():
            token = rest.strip().strip(b'"').decode("latin-1")
        elif part.strip():
            kept.append(part.strip())
    return token, b"; ".join(kept)


def _close_code(code: int) -> int:
    # Codes a peer may not send on the wire (1005, 1006, 1015) become a normal closure.
    return 1000 if code in (1005, 1006, 1015) or not 1000 <= code <= 4999 else code


#: The path form, as the OpenAPI document names it (the host form is routed by ``Host``).
PORTS_PATH = "/sandboxes/{sandbox_id}/ports/{port}/{path}"
PORTS_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def ports_openapi_paths(error: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The exposed ports' gateway in the server's OpenAPI document."""
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": kind}}
        for name, kind in (("sandbox_id", "string"), ("port", "integer"), ("path", "string"))
    ]
    ops: dict[str, Any] = {}
    for method in PORTS_METHODS:
        ops[method.lower()] = {
            "summary": "An exposed port of the sandbox, proxied (also served at "
            "{port}-{sandbox_id}.{domain} with --domain; WebSocket and h2c upgrades pass "
            "through; HTTP/2 with prior knowledge served, and spoken to http2 sandboxes); "
            "public unless the sandbox has protect_ports",
            "operationId": f"port_{method.lower()}",
            "parameters": params,
            "responses": {
                "200": {"description": "the sandbox server's answer"},
                "401": {"description": "protected port: token missing or wrong", **error},
                "404": {"description": "no such sandbox, or the port is not exposed", **error},
                "502": {"description": "nothing listens on the port", **error},
                "503": {"description": "port_busy: too many requests in flight to it", **error},
            },
        }
    return {PORTS_PATH: ops}
