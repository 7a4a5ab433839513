"""Which requests are for an exposed port, and their way there: the URL forms, the port's token
(protected ports), lifecycle activity and admission, then HTTP, WebSocket or the runner's raw
tunnel.

URL forms of an exposed port (both served by the server's own listener):

- path form, always: ``{server}/sandboxes/{id}/ports/{port}/{path}`` -- the prefix is stripped
  before the request reaches the sandbox (which sees ``/{path}``; ``X-Forwarded-Prefix`` says what
  was stripped). This is what ``expose_port()`` returns as ``exposed_at``.
- host form, when the server runs with ``--domain D``: ``http://{port}-{id}.D/{path}``, routed by
  the ``Host`` header, the path passed unchanged (apps with absolute links work here).
"""

from __future__ import annotations

import hmac
import re
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from sandlot.server.control.lifecycle import Lifecycle
from sandlot.server.errors import WakeError
from sandlot.server.gateway.admission import Busy
from sandlot.server.gateway.asgi import header, refuse_websocket, send_json
from sandlot.server.gateway.ports.forward import Forward, PortPools, Target
from sandlot.server.gateway.ports.http import forward_http
from sandlot.server.gateway.ports.registry import PortRegistry
from sandlot.server.gateway.ports.tokens import TOKEN_COOKIE, TOKEN_PARAM, given_token
from sandlot.server.gateway.ports.websocket import relay_websocket

#: The path form, as the OpenAPI document names it (the host form is routed by ``Host``).
PORTS_PATH = "/sandboxes/{sandbox_id}/ports/{port}/{path}"
PORTS_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_PATH_FORM = re.compile(r"^/sandboxes/([A-Za-z0-9_-]{1,64})/ports/([^/]*)(/.*)?$")
_HOST_LABEL = re.compile(r"^(\d{1,5})-([a-z0-9_-]{1,64})$")


def port_number(text: str) -> int | None:
    """A port number written in ASCII digits (``int()`` also takes '٣' and raises on '²')."""
    if re.fullmatch(r"[0-9]{1,5}", text) and 1 <= int(text) <= 65535:
        return int(text)
    return None


def normal_domain(domain: str | None) -> str | None:
    """``--domain`` as the router compares it: lower case, no dots around (None: none)."""
    return (domain or "").strip().lower().strip(".") or None


class PortRouter:
    """Answers the requests for exposed ports; hands every other one to the app it wraps."""

    def __init__(
        self,
        domain: str | None,
        registry: PortRegistry,
        pools: PortPools,
        lifecycle: Lifecycle,
    ) -> None:
        self.domain = normal_domain(domain)
        self._domain_host = self.domain.rsplit(":", 1)[0] if self.domain else ""
        self.registry = registry
        self.pools = pools
        self.lifecycle = lifecycle

    def match(self, scope: Scope) -> Target | None:
        if self.domain is not None:
            host = (header(scope, b"host") or b"").decode("latin-1").lower()
            host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host.endswith("." + self._domain_host):
                label = _HOST_LABEL.match(host[: -len(self._domain_host) - 1])
                if label is not None:
                    return Target(label.group(2), label.group(1), scope["path"], "")
        found = _PATH_FORM.match(scope["path"])
        if found is None:
            return None
        sandbox_id, port_text, rest = found.groups()
        prefix = f"/sandboxes/{sandbox_id}/ports/{port_text}"
        return Target(sandbox_id, port_text, rest or "", prefix)

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

    async def serve(self, target: Target, scope: Scope, receive: Receive, send: Send) -> None:
        is_ws = scope["type"] == "websocket"

        async def refuse(status: int, code: str, message: str, **extra: Any) -> None:
            body = {"error": message, "code": code, **extra}
            if is_ws:
                await refuse_websocket(scope, send, status, body)
            else:
                await send_json(send, status, body)

        text = target.port_text
        port = port_number(text)
        if port is None:
            await refuse(404, "port_not_exposed", f"{text[:20]!r} is not a port (1-65535)")
            return
        exposed = await self.registry.exposed(target.sandbox_id)
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
            given, query, from_query = given_token(scope, query)
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
            async with self.lifecycle.activity(target.sandbox_id):
                agent = await self.registry.agent(target.sandbox_id)
                if agent is None:
                    await refuse(404, "not_found", f"sandbox {target.sandbox_id} not found")
                    return
                forward = Forward(target, port, query, bool(token), set_cookie)
                raw = (scope.get("extensions") or {}).get("sandlot.raw_tunnel")
                if (
                    is_ws and raw is not None
                ):  # sandlot's runner: bytes both ways (runner/protocols.py)
                    await raw["run"](agent, forward, scope)
                elif is_ws:
                    await relay_websocket(agent, forward, scope, receive, send)
                else:
                    pool = self.pools.pool(target.sandbox_id, agent, port, exposed.protocol)
                    async with self.pools.slots(target.sandbox_id, port).slot():
                        await forward_http(pool, forward, scope, receive, send)
        except WakeError as exc:
            await refuse(503, "wake_failed", str(exc))
        except Busy as exc:
            await refuse(
                503,
                "port_busy",
                f"port {port} of sandbox {target.sandbox_id} is busy: {exc} (limit "
                f"{self.pools.limits.max_requests} at once, sandlot server --max-port-requests)",
                port=port,
            )
