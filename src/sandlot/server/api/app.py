"""The sandlot server's ASGI app: the control API (``/v1/...``, :mod:`.routes`), the agent
gateway (``/sandboxes/{id}/koyeb-sandbox/...``), the exposed ports (path and host forms) and the
OpenAPI document (``/openapi.json``), with the background loops (lifecycle timers, warm pools,
TCP proxies) running for the app's lifespan.

Host paths as images (outside the trusted image directories) stay with the socket's owner,
whatever a token's scope (:mod:`.auth` says who is who).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from sandlot.server.api.http import INTERNAL, error_response, wrap
from sandlot.server.api.openapi import openapi_document
from sandlot.server.api.portsonly import PortsOnly, not_a_port
from sandlot.server.api.routes import Api
from sandlot.server.config import ServerConfig
from sandlot.server.control.agentwatch import AgentWatch
from sandlot.server.control.control import Control
from sandlot.server.control.sqlitefiles import DatabaseFull
from sandlot.server.control.store import Store
from sandlot.server.errors import API_TOKEN_PREFIX
from sandlot.server.gateway.admission import TokenRequestLimit
from sandlot.server.gateway.agent import GATEWAY_METHODS, GATEWAY_PATH, Gateway
from sandlot.server.gateway.ports.service import Ports

__all__ = ["create_app", "openapi_document"]


def create_app(config: ServerConfig) -> Starlette:
    store = Store(config.database_url, Path(config.key_file) if config.key_file else None)
    control = Control(
        store,
        dict(config.engines),
        config.default_region,
        config.pools,
        default_runtime=config.default_runtime,
    )
    ports = Ports(config, control)
    api = Api(config, control, ports)
    routes: list[BaseRoute] = [
        Route(r.path, wrap(r.handler), methods=[r.method]) for r in api.routes()
    ]
    routes.append(Route(GATEWAY_PATH, Gateway(control), methods=GATEWAY_METHODS))

    async def owned_loops() -> None:
        """What one server of a store runs: lifecycle timers, warm pools, agent probes."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(control.lifecycle.run)
            if control.pools is not None:
                tg.start_soon(control.pools.run)
            tg.start_soon(AgentWatch(control, config.agent_probe).run)

    async def lead() -> None:
        await control.reconcile(config.stale_create_after)
        await control.lifecycle.load()
        await owned_loops()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        leadership = config.leadership
        if leadership is None:
            await control.reconcile(config.stale_create_after)
            await control.lifecycle.load()
        try:
            async with anyio.create_task_group() as tg:
                if leadership is None:
                    tg.start_soon(owned_loops)
                else:  # one replica of several: the owned loops while it leads
                    tg.start_soon(leadership.lead, lead)
                    tg.start_soon(control.lifecycle.follow)
                tg.start_soon(ports.run)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            # Outside the cancelled task group, shielded: inside it, the first await of the
            # clean-up was cancelled (relays, proxies and the engine were not closed) and the
            # cancellation replaced any error that was on its way out.
            with anyio.CancelScope(shield=True):
                if leadership is not None:
                    await leadership.release()
                await ports.close()
                await control.close()

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, "not_found", f"no route for {request.method} {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(405, "method_not_allowed", f"{request.method} not allowed here")

    async def disk_full(request: Request, exc: Exception) -> Response:
        return error_response(507, "insufficient_storage", str(exc))

    async def internal(request: Request, exc: Exception) -> Response:
        return error_response(500, "internal", INTERNAL)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            404: not_found,
            405: method_not_allowed,
            DatabaseFull: disk_full,
            500: internal,
        },
    )
    app.add_middleware(_PortsMiddleware, ports=ports)  # exposed ports' URLs first
    app.add_middleware(TokenRequestLimit, limit=config.token_requests, prefix=API_TOKEN_PREFIX)
    if config.ports_listen is not None:  # (added last: outermost)
        app.add_middleware(
            PortsOnly,
            address=config.ports_listen,
            ports_app=ports.router.middleware(not_a_port),
        )
    app.state.control = control
    app.state.api = api
    app.state.ports = ports  # read by the runner's raw WebSocket protocol (runner/protocols.py)
    app.state.max_json_body = config.max_json_body
    app.state.h2_limits = config.h2_limits  # read by the HTTP/2 server (h2serve.limits_of)
    return app


class _PortsMiddleware:
    """Exposed ports' URLs (path and host form) are answered by
    :mod:`sandlot.server.gateway.ports.router`."""

    def __init__(self, app: Any, ports: Ports) -> None:
        self.handle = ports.router.middleware(app)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.handle(scope, receive, send)
