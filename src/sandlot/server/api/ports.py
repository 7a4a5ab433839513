"""The exposed ports' routes: expose, unexpose and list (the gateway that serves them is
:mod:`sandlot.server.gateway.ports`)."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from sandlot.server.api.auth import Auth
from sandlot.server.api.handlers import Handlers
from sandlot.server.api.http import json_response, parse_body
from sandlot.server.api.render import Renderer
from sandlot.server.config import ServerConfig
from sandlot.server.control.control import Control
from sandlot.server.control.tables import SandboxRow
from sandlot.server.errors import ApiError
from sandlot.server.gateway.ports.registry import new_port_info
from sandlot.server.gateway.ports.router import port_number
from sandlot.server.gateway.ports.service import Ports
from sandlot.server.schemas import ExposePort, PortsOut, TcpProxyOut, UnexposedOut
from sandlot.server.status import SandboxStatus


class PortHandlers(Handlers):
    def __init__(
        self, config: ServerConfig, control: Control, auth: Auth, render: Renderer, ports: Ports
    ) -> None:
        super().__init__(config, control, auth, render)
        self.ports = ports
        self.registry = ports.registry

    async def _live_row(self, request: Request) -> SandboxRow:
        who = await self.principal(request)
        row: SandboxRow = await self.control.get(who.project, request.path_params["sandbox_id"])
        if row.status not in (SandboxStatus.RUNNING, SandboxStatus.SLEEPING):
            raise ApiError(409, "not_running", f"sandbox {row.id} is {row.status}")
        return row

    async def expose(self, request: Request) -> Response:
        row = await self._live_row(request)
        req: ExposePort = await parse_body(request, ExposePort)
        self.registry.check_room(row.id, row.exposed_ports or {}, req.port)
        status, answer = await self.registry.agent_call(
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
                self.registry.check_room(row.id, ports, req.port)
            except ApiError as exc:
                full.append(exc)
                return
            ports[str(req.port)] = ports.get(str(req.port)) or new_port_info(protect)

        ports = await self.registry.change(row.id, add)
        if full:
            await self.registry.agent_call(row.id, "/unbind_port", {"port": str(req.port)})
            raise full[0]
        base = self.render.ports_base(request)
        info = ports.get(str(req.port), {})
        return json_response(
            self.render.port(base, row.id, req.port, info, row.exposed_port_protocol)
        )

    async def unexpose(self, request: Request) -> Response:
        row = await self._live_row(request)
        raw = request.query_params.get("port")
        port: int | None = None
        if raw is not None:
            port = port_number(raw)
            if port is None:
                raise ApiError(400, "invalid_port", f"port must be 1-65535, not {raw[:20]!r}")
            if str(port) not in (row.exposed_ports or {}):
                raise ApiError(
                    404, "port_not_exposed", f"port {port} is not exposed on sandbox {row.id}"
                )
        status, answer = await self.registry.agent_call(
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

        ports = await self.registry.change(row.id, drop)
        self.ports.closed(row.id, removed)
        return json_response(UnexposedOut(unexposed=sorted(removed), ports=sorted(map(int, ports))))

    async def list_ports(self, request: Request) -> Response:
        who = await self.principal(request)
        row: SandboxRow = await self.control.get(who.project, request.path_params["sandbox_id"])
        base = self.render.ports_base(request)
        ports = sorted((int(p), v) for p, v in (row.exposed_ports or {}).items())
        proxy = None
        awake_or_asleep = row.status in (SandboxStatus.RUNNING, SandboxStatus.SLEEPING)
        if row.enable_tcp_proxy and not row.protect_ports and awake_or_asleep:
            listener = await self.ports.tcp.ensure(row.id)
            host, port = listener.getsockname()[:2]
            proxy = TcpProxyOut(host=host, port=port)
        return json_response(
            PortsOut(
                ports=[
                    self.render.port(base, row.id, p, v, row.exposed_port_protocol)
                    for p, v in ports
                ],
                tcp_proxy=proxy,
                domain=self.render.domain_for(base),
            )
        )
