"""The snapshots' routes: take one of a sandbox, list, get and delete them, and fork a
sandbox (spawning from a snapshot is ``POST /v1/sandboxes`` with ``snapshot``)."""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import Response

from sandlot.server.api.handlers import Handlers
from sandlot.server.api.http import cancel_on_disconnect, json_response, parse_body
from sandlot.server.errors import ApiError
from sandlot.server.schemas import CreateSnapshot, ForkSandbox, SandboxList, SnapshotList
from sandlot.server.status import SnapshotStatus


class SnapshotHandlers(Handlers):
    async def create_snapshot(self, request: Request) -> Response:
        who = await self.principal(request)
        req = await parse_body(request, CreateSnapshot)
        sandbox_id = request.path_params["sandbox_id"]
        with anyio.CancelScope(shield=True):  # a copy, once begun, completes (or fails)
            row = await self.control.snapshots.create(who.project, sandbox_id, req)
        return json_response(self.render.snapshot(row), 201)

    async def list_snapshots(self, request: Request) -> Response:
        who = await self.principal(request)
        q = request.query_params
        status = q.get("status")
        if status is not None and status not in set(SnapshotStatus):
            raise ApiError(400, "invalid_request", f"unknown snapshot status {status!r}")
        kind = q.get("snapshot_type")
        if kind is not None and kind not in ("filesystem", "full"):
            raise ApiError(400, "invalid_request", "snapshot_type is filesystem or full")
        labels: dict[str, str] = {}
        for item in q.getlist("label"):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ApiError(400, "invalid_request", f"label filter {item!r} must be KEY=VALUE")
            labels[key] = value
        rows = await self.control.db(
            self.store.list_snapshots, who.project, q.get("sandbox_id"), kind, status, labels
        )
        return json_response(SnapshotList(snapshots=[self.render.snapshot(r) for r in rows]))

    async def get_snapshot(self, request: Request) -> Response:
        who = await self.principal(request)
        row = await self.control.snapshots.get(who.project, request.path_params["snapshot_id"])
        return json_response(self.render.snapshot(row))

    async def delete_snapshot(self, request: Request) -> Response:
        who = await self.principal(request)
        with anyio.CancelScope(shield=True):
            row = await self.control.snapshots.delete(
                who.project, request.path_params["snapshot_id"]
            )
        return json_response(self.render.snapshot(row))

    async def fork_sandbox(self, request: Request) -> Response:
        who = await self.principal(request)
        req = await parse_body(request, ForkSandbox)
        sandbox_id = request.path_params["sandbox_id"]
        rows = await cancel_on_disconnect(
            request,
            lambda: self.control.snapshots.fork(
                who.project, sandbox_id, req.n, req.wait_ready, req.timeout, who.may_be_privileged
            ),
        )
        if rows is None:
            return Response(status_code=499)
        out = [self.render.sandbox(r, request, True) for r in rows]
        return json_response(SandboxList(sandboxes=out), 201)
