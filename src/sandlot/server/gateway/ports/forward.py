"""One request's way to an exposed port: the headers it keeps and gets, the path the sandbox
sees, the port's connections (keep-alive HTTP/1.1 tunnels through the agent, or one HTTP/2
connection) and its admission slots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.types import Scope

from sandlot.engines.base import AgentAddress
from sandlot.server.config import PortLimits
from sandlot.server.errors import API_TOKEN_PREFIX
from sandlot.server.gateway.admission import Admission
from sandlot.server.gateway.asgi import HOP_BY_HOP_REQUEST, HOP_BY_HOP_RESPONSE
from sandlot.server.gateway.h2upstream import H2PortPool
from sandlot.server.gateway.ports.tokens import token_cookie
from sandlot.server.gateway.tunnel import open_tunnel
from sandlot.server.upstream import AgentPool, Connection

_DROP_REQUEST = HOP_BY_HOP_REQUEST | {
    b"expect",  # the server answers 100-continue itself when the body is read
    b"content-length",  # set again below
    b"x-forwarded-prefix",
}
#: (``date``: the server in front adds its own.)
DROP_RESPONSE = HOP_BY_HOP_RESPONSE | {b"date"}
_TOKEN_PREFIX = API_TOKEN_PREFIX.encode()


@dataclass
class Target:
    """Which sandbox and port a request is for, and the path it asks."""

    sandbox_id: str
    port_text: str
    path: str
    #: What the path form strips ("" for the host form).
    prefix: str


@dataclass
class Forward:
    """One request's way to a port: what to strip and add."""

    target: Target
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
                _, v = token_cookie(v)
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


class PortPool(AgentPool):
    """Keep-alive HTTP/1.1 connections to one port in one sandbox, each a tunnel through the
    agent: the gateway's agent client (request writing, response parsing, pooling) reused."""

    def __init__(self, address: AgentAddress, secret: bytes | None, port: int) -> None:
        super().__init__(address, secret)
        self.port = port

    async def _connect(self) -> Connection:
        reader, writer = await open_tunnel(self.address, self.secret, self.port)
        return Connection(reader, writer)


class PortPools:
    """Every exposed port's connections and admission slots, by (sandbox, port)."""

    def __init__(self, limits: PortLimits) -> None:
        self.limits = limits
        self._pools: dict[tuple[str, int], PortPool | H2PortPool] = {}
        #: Requests in flight per (sandbox, port): see :mod:`..admission`.
        self._slots: dict[tuple[str, int], Admission] = {}

    def pool(
        self, sandbox_id: str, agent: AgentPool, port: int, protocol: str
    ) -> PortPool | H2PortPool:
        """The port's keep-alive HTTP/1.1 pool, or its HTTP/2 connection when the sandbox was
        created with ``exposed_port_protocol="http2"``."""
        kind = H2PortPool if protocol == "http2" else PortPool
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

    def slots(self, sandbox_id: str, port: int) -> Admission:
        slots = self._slots.get((sandbox_id, port))
        if slots is None:
            lim = self.limits
            slots = Admission(lim.max_requests, lim.max_queued, lim.queue_timeout)
            self._slots[(sandbox_id, port)] = slots
        return slots

    def close_port(self, sandbox_id: str, port: int) -> None:
        pool = self._pools.pop((sandbox_id, port), None)
        if pool is not None:
            pool.close()
        self._slots.pop((sandbox_id, port), None)

    def forget(self, sandbox_id: str) -> None:
        for key in [k for k in self._pools if k[0] == sandbox_id]:
            self._pools.pop(key).close()
        for key in [k for k in self._slots if k[0] == sandbox_id]:
            del self._slots[key]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
