"""The sandboxes' routes: create, list, get, update, delete and history."""

from __future__ import annotations

import functools

import anyio
from starlette.requests import Request
from starlette.responses import Response

from sandlot.images.trust import ImageRefused
from sandlot.server.api.auth import Auth
from sandlot.server.api.handlers import Handlers
from sandlot.server.api.http import cancel_on_disconnect, json_response, parse_body
from sandlot.server.api.render import Renderer
from sandlot.server.config import ServerConfig
from sandlot.server.control.control import Control
from sandlot.server.errors import ApiError
from sandlot.server.gateway.ports.service import Ports
from sandlot.server.schemas import (
    CreateSandbox,
    DeletedOut,
    EventList,
    SandboxList,
    UpdateSandbox,
)


class SandboxHandlers(Handlers):
    def __init__(
        self, config: ServerConfig, control: Control, auth: Auth, render: Renderer, ports: Ports
    ) -> None:
        super().__init__(config, control, auth, render)
        self.ports = ports

    async def create_sandbox(self, request: Request) -> Response:
        who = await self.principal(request)
        req = await parse_body(request, CreateSandbox)
        if req.image:
            try:
                # off the event loop: a registry's name may be resolved
                image = await anyio.to_thread.run_sync(
                    functools.partial(self.config.image_trust.check, req.image, local=who.admin)
                )
            except ImageRefused as exc:
                raise ApiError(403, "forbidden", str(exc)) from None
            req = req.model_copy(update={"image": image})
        # A client that disconnects mid-create cancels it (and Control cleans up): otherwise
        # the sandbox would run with nobody knowing its id.
        row = await cancel_on_disconnect(
            request, lambda: self.control.create(who.project, req, who.may_be_privileged)
        )
        if row is None:
            return Response(status_code=499)
        row = await self.ports.after_create(row, req.protect_ports, req.enable_tcp_proxy)
        return json_response(self.render.sandbox(row, request, True), 201)

    async def list_sandboxes(self, request: Request) -> Response:
        who = await self.principal(request)
        name = request.query_params.get("name")
        labels: dict[str, str] = {}
        for item in request.query_params.getlist("label"):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ApiError(400, "invalid_request", f"label filter {item!r} must be KEY=VALUE")
            labels[key] = value
        rows = await self.control.db(self.store.list_sandboxes, who.project, name, labels)
        return json_response(
            SandboxList(sandboxes=[self.render.sandbox(r, request, False) for r in rows])
        )

    async def get_sandbox(self, request: Request) -> Response:
        who = await self.principal(request)
        row = await self.control.get(who.project, request.path_params["sandbox_id"])
        return json_response(self.render.sandbox(row, request, True))

    async def update_sandbox(self, request: Request) -> Response:
        who = await self.principal(request)
        req = await parse_body(request, UpdateSandbox)
        fields = req.model_dump(exclude_unset=True)
        if "enable_light_sleep" in fields:
            value = fields.pop("enable_light_sleep")
            if value is not None:
                fields["light_sleep"] = value
        for key in ("idle_timeout", "labels"):
            if key in fields and fields[key] is None:
                raise ApiError(400, "invalid_request", f"{key} cannot be null")
        row = await self.control.update(who.project, request.path_params["sandbox_id"], fields)
        return json_response(self.render.sandbox(row, request, True))

    async def delete_sandbox(self, request: Request) -> Response:
        who = await self.principal(request)
        sandbox_id = request.path_params["sandbox_id"]
        with anyio.CancelScope(shield=True):  # a delete, once begun, completes
            await self.control.delete(who.project, sandbox_id)
        return json_response(DeletedOut(id=sandbox_id, status="deleted"))

    async def sandbox_events(self, request: Request) -> Response:
        who = await self.principal(request)
        rows = await self.control.events(who.project, request.path_params["sandbox_id"])
        return json_response(EventList(events=[self.render.event(e) for e in rows]))
