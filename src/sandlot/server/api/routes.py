"""The control API's routing table: every route, its handler and its OpenAPI description, in
one list (``GET /openapi.json`` is made from it)."""

from __future__ import annotations

import os

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import sandlot
from sandlot._build import PACKAGE_DIR, build_id
from sandlot.server.api.admin import AdminHandlers
from sandlot.server.api.auth import Auth, via_admin_socket
from sandlot.server.api.http import json_response
from sandlot.server.api.openapi import ApiRoute, openapi_document
from sandlot.server.api.ports import PortHandlers
from sandlot.server.api.render import Renderer
from sandlot.server.api.sandboxes import SandboxHandlers
from sandlot.server.api.snapshots import SnapshotHandlers
from sandlot.server.config import ServerConfig
from sandlot.server.control.control import Control
from sandlot.server.gateway.ports.service import Ports
from sandlot.server.schemas import (
    CreateSandbox,
    CreateSecret,
    CreateSnapshot,
    CreateToken,
    DeletedOut,
    EventList,
    ExposedPortOut,
    ExposePort,
    ForkSandbox,
    HealthOut,
    PortsOut,
    QuotaList,
    QuotaOut,
    SandboxList,
    SandboxOut,
    SecretList,
    SecretOut,
    SetQuota,
    SnapshotList,
    SnapshotOut,
    TokenList,
    TokenOut,
    UnexposedOut,
    UpdateSandbox,
)


class Api:
    """The control API of one server: its handlers, bound to the server's state."""

    def __init__(self, config: ServerConfig, control: Control, ports: Ports) -> None:
        self.config = config
        self.control = control
        auth = Auth(config, control)
        render = Renderer(config, control.store)
        self.sandboxes = SandboxHandlers(config, control, auth, render, ports)
        self.ports = PortHandlers(config, control, auth, render, ports)
        self.admin = AdminHandlers(config, control, auth, render)
        self.snapshots = SnapshotHandlers(config, control, auth, render)

    async def health(self, request: Request) -> Response:
        out = HealthOut(
            status="ok", version=sandlot.__version__, regions=sorted(self.control.engines)
        )
        if via_admin_socket(request, self.config):
            out.build, out.package, out.pid = build_id(), str(PACKAGE_DIR), os.getpid()
        return json_response(out)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(self.routes()))

    def routes(self) -> list[ApiRoute]:
        """The routing table: every route, its handler and its OpenAPI description."""
        sid = "/v1/sandboxes/{sandbox_id}"
        s, p, a, sn = self.sandboxes, self.ports, self.admin, self.snapshots
        return [
            ApiRoute(
                "GET", "/v1/health", self.health, "Server health", None, HealthOut, auth=False
            ),
            ApiRoute(
                "POST",
                "/v1/sandboxes",
                s.create_sandbox,
                "Create a sandbox",
                CreateSandbox,
                SandboxOut,
                status=201,
                errors=("409", "503", "507"),  # 409: its snapshot is not available
            ),
            ApiRoute(
                "GET",
                "/v1/sandboxes",
                s.list_sandboxes,
                "List sandboxes (filters: name=, label=KEY=VALUE repeated)",
                None,
                SandboxList,
                query=["name", "label"],
            ),
            ApiRoute(
                "GET", sid, s.get_sandbox, "Get a sandbox (with its secret)", None, SandboxOut
            ),
            ApiRoute(
                "PATCH",
                sid,
                s.update_sandbox,
                "Update lifecycle fields and labels",
                UpdateSandbox,
                SandboxOut,
            ),
            ApiRoute("DELETE", sid, s.delete_sandbox, "Delete a sandbox", None, DeletedOut),
            ApiRoute(
                "GET",
                sid + "/events",
                s.sandbox_events,
                "A sandbox's history: created, slept, woke, deleted, error",
                None,
                EventList,
            ),
            ApiRoute(
                "POST",
                sid + "/ports",
                p.expose,
                "Expose a port: served at {server}/sandboxes/{id}/ports/{port}/ (and "
                "{port}-{id}.{domain} with --domain); 409 on conflict when exclusive, or past "
                "the sandbox's limit of exposed ports (too_many_ports)",
                ExposePort,
                ExposedPortOut,
            ),
            ApiRoute(
                "DELETE",
                sid + "/ports",
                p.unexpose,
                "Unexpose one port (?port=N; 404 if it is not exposed) or all of them",
                None,
                UnexposedOut,
                query=["port"],
            ),
            ApiRoute(
                "GET",
                sid + "/ports",
                p.list_ports,
                "Exposed ports, the TCP proxy's address and the ports' domain",
                None,
                PortsOut,
            ),
            ApiRoute(
                "POST",
                sid + "/snapshots",
                sn.create_snapshot,
                "Snapshot a sandbox's filesystem (full: also memory and processes, where the "
                "runtime can); 409 if the sandbox was deleted, 507 if the disk cannot hold it",
                CreateSnapshot,
                SnapshotOut,
                status=201,
                errors=("409", "507"),
            ),
            ApiRoute(
                "POST",
                sid + "/fork",
                sn.fork_sandbox,
                "Start n new sandboxes from this one's current filesystem, each with its own "
                "secret, network and lifecycle",
                ForkSandbox,
                SandboxList,
                status=201,
                errors=("409", "503", "507"),
            ),
            ApiRoute(
                "GET",
                "/v1/snapshots",
                sn.list_snapshots,
                "List the project's snapshots (filters: sandbox_id=, snapshot_type=, status=, "
                "label=KEY=VALUE repeated)",
                None,
                SnapshotList,
                query=["sandbox_id", "snapshot_type", "status", "label"],
            ),
            ApiRoute(
                "GET",
                "/v1/snapshots/{snapshot_id}",
                sn.get_snapshot,
                "Get a snapshot (deleted ones too, with status deleted)",
                None,
                SnapshotOut,
            ),
            ApiRoute(
                "DELETE",
                "/v1/snapshots/{snapshot_id}",
                sn.delete_snapshot,
                "Delete a snapshot; 409 while a sandbox or another snapshot uses it",
                None,
                SnapshotOut,
                errors=("409",),
            ),
            ApiRoute(
                "POST",
                "/v1/tokens",
                a.create_token,
                "Create an API token (Unix socket or admin scope)",
                CreateToken,
                TokenOut,
                status=201,
            ),
            ApiRoute(
                "GET",
                "/v1/tokens",
                a.list_tokens,
                "List API tokens (Unix socket or admin scope)",
                None,
                TokenList,
                query=["project"],
            ),
            ApiRoute(
                "DELETE",
                "/v1/tokens/{token_id}",
                a.revoke_token,
                "Revoke an API token (Unix socket or admin scope)",
                None,
                TokenOut,
            ),
            ApiRoute(
                "GET",
                "/v1/quotas",
                a.list_quotas,
                "Quotas and usage: every project's (admin) or the token's own",
                None,
                QuotaList,
            ),
            ApiRoute(
                "GET",
                "/v1/quotas/{project}",
                a.get_quota,
                "A project's quota and usage (a token: its own project only)",
                None,
                QuotaOut,
            ),
            ApiRoute(
                "PATCH",
                "/v1/quotas/{project}",
                a.set_quota,
                "Set a project's limits (omitted: unchanged; null: unlimited; admin only)",
                SetQuota,
                QuotaOut,
            ),
            ApiRoute(
                "DELETE",
                "/v1/quotas/{project}",
                a.delete_quota,
                "Remove a project's quota (admin only)",
                None,
                QuotaOut,
            ),
            ApiRoute(
                "POST",
                "/v1/secrets",
                a.create_secret,
                "Create a registry secret (for registry_secret=NAME)",
                CreateSecret,
                SecretOut,
                status=201,
            ),
            ApiRoute(
                "GET",
                "/v1/secrets",
                a.list_secrets,
                "List the project's secrets (never their passwords)",
                None,
                SecretList,
            ),
            ApiRoute(
                "DELETE",
                "/v1/secrets/{name}",
                a.delete_secret,
                "Delete a secret (sandboxes created with it keep running)",
                None,
                SecretOut,
            ),
            ApiRoute("GET", "/openapi.json", self.openapi, "This document", None, None, auth=False),
        ]
