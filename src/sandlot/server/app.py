"""The sandlot server: one ASGI app with the control API (``/v1/...``), the gateway
(``/sandboxes/{id}/koyeb-sandbox/...``) and its OpenAPI document (``/openapi.json``).

Authentication depends on where the server listens. On its Unix socket the socket's file
permissions are the authentication: every request is the administrator's, acting in the project
named by the ``X-Sandlot-Project`` header (``default`` without it). On TCP every control request
needs ``Authorization: Bearer <API token>`` and sees only its token's project. A token's scope
says what else it may do: ``privileged`` tokens may create privileged sandboxes, ``admin``
tokens may also manage tokens and quotas (of every project). Host paths as images (outside the
trusted image directories) stay with the socket's owner, whatever a token's scope.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import anyio
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

import sandlot
from sandlot._build import PACKAGE_DIR, build_id
from sandlot.engines.base import Engine
from sandlot.images.trust import ImageRefused, ImageTrust
from sandlot.server.admission import TOKEN_REQUESTS, PortLimits, TokenRequestLimit
from sandlot.server.agentwatch import AgentWatch, ProbeSettings
from sandlot.server.control import API_TOKEN_PREFIX, ApiError, Control
from sandlot.server.db import (
    DEFAULT_PROJECT,
    ApiToken,
    DatabaseFull,
    ProjectQuota,
    RegistrySecret,
    SandboxRow,
    Store,
    Usage,
)
from sandlot.server.gateway import Gateway
from sandlot.server.h2limits import H2Limits
from sandlot.server.pool import PoolKey
from sandlot.server.ports import (
    ExposedPortOut,
    ExposePort,
    Ports,
    PortsOut,
    UnexposedOut,
    ports_openapi_paths,
)
from sandlot.server.redact import hide_host_paths
from sandlot.server.schemas import (
    PROJECT_PATTERN,
    CreateSandbox,
    CreateSecret,
    CreateToken,
    DeletedOut,
    ErrorOut,
    EventList,
    EventOut,
    HealthOut,
    QuotaList,
    QuotaOut,
    QuotaUsage,
    SandboxList,
    SandboxOut,
    SecretList,
    SecretOut,
    SetQuota,
    TokenList,
    TokenOut,
    UpdateSandbox,
)

AuthMode = Literal["socket", "token"]
log = logging.getLogger("sandlot.server")
#: The whole answer to a bug: details go to the server's log, never to the client.
_INTERNAL = "internal error (the server's log has the details)"
#: The largest JSON request body the control API reads (``--max-json-body``): a create is
#: about 1 KiB. Before the limit, a 1 GiB JSON body took the server to 3.1 GiB.
MAX_JSON_BODY = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    database_url: str
    engines: dict[str, Engine]
    default_region: str
    auth: AuthMode
    #: Base of the sandbox URLs handed to clients, e.g. ``http://127.0.0.1:7000``.
    #: For a Unix socket: ``http+unix://<quoted socket path>``. None: from each request.
    public_url: str | None = None
    #: Rows still "creating" this long after creation are discarded at startup (a crash).
    stale_create_after: float = 0.0
    #: Warm pools: how many ready sandboxes to keep per (image, instance type).
    pools: dict[PoolKey, int] = field(default_factory=dict)
    #: Wildcard domain for exposed ports' host form ``{port}-{id}.{domain}`` (None: path form only).
    domain: str | None = None
    #: Where TCP proxies listen (``enable_tcp_proxy``).
    tcp_proxy_host: str = "127.0.0.1"
    #: Who may use host paths and OCI layouts as images (``--trusted-image-dir``).
    image_trust: ImageTrust = field(default_factory=ImageTrust)
    #: The Unix socket whose clients are the socket's owner (admin, like ``auth="socket"``)
    #: even on a TCP server: the CLI's way in (see :mod:`sandlot.server.run`).
    admin_socket: str | None = None
    #: The server key's file (None: beside a SQLite database, else in the state directory;
    #: see serverkey.py).
    key_file: str | None = None
    #: The largest JSON request body the control API accepts (413 past it).
    max_json_body: int = MAX_JSON_BODY
    #: Per-connection bounds of HTTP/2 clients (h2serve.py).
    h2_limits: H2Limits = field(default_factory=H2Limits)
    #: Per-sandbox bounds of exposed ports (ports.py).
    port_limits: PortLimits = field(default_factory=PortLimits)
    #: Requests in flight per API token (admission.py).
    token_requests: int = TOKEN_REQUESTS
    #: The agents' health probe (agentwatch.py).
    agent_probe: ProbeSettings = field(default_factory=ProbeSettings)


@dataclass(frozen=True)
class Principal:
    project: str
    #: The local Unix socket's owner (the host's administrator, trusted with everything,
    #: host paths as images included).
    admin: bool
    #: An API token's scope (the socket's owner: "admin").
    scope: str = "admin"

    @property
    def may_be_privileged(self) -> bool:
        return self.admin or self.scope in ("privileged", "admin")

    @property
    def may_administer(self) -> bool:
        return self.admin or self.scope == "admin"


# -- helpers ----------------------------------------------------------------------------------


def _iso(value: Any) -> str:
    return value.isoformat() if value is not None else ""


def via_admin_socket(request: Request, config: ServerConfig) -> bool:
    """Did ``request`` come in on the admin Unix socket? The ASGI server says which socket a
    connection was accepted on: ``(path, None)`` for a Unix one (uvicorn, h2serve), ``(host,
    port)`` for TCP; a client cannot choose it."""
    if config.auth == "socket":
        return True
    server = request.scope.get("server")
    return (
        config.admin_socket is not None
        and isinstance(server, tuple | list)
        and len(server) == 2
        and server[1] is None
        and server[0] == config.admin_socket
    )


def _public_base(request: Request, config: ServerConfig) -> str:
    if config.public_url:
        return config.public_url.rstrip("/")
    if config.admin_socket is not None and via_admin_socket(request, config):
        return unix_public_url(config.admin_socket)
    return str(request.base_url).rstrip("/")


def sandbox_out(
    row: SandboxRow, base: str, store: Store, with_secret: bool, domain: str | None = None
) -> SandboxOut:
    """The API's view of a sandbox; its secret (on create and get) and env are opened here."""
    url = f"{base}/sandboxes/{row.id}/koyeb-sandbox"
    domain = domain or base.split("://", 1)[-1]
    return SandboxOut(
        id=row.id,
        name=row.name,
        status=row.status,  # type: ignore[arg-type]
        sleep_kind=row.sleep_kind if row.status == "sleeping" else None,  # type: ignore[arg-type]
        last_activity_at=_iso(row.last_activity_at) if row.last_activity_at else None,
        image=row.image,
        instance_type=row.instance_type,
        region=row.region,
        created_at=_iso(row.created_at),
        updated_at=_iso(row.updated_at),
        labels=row.labels or {},
        env=store.sandbox_env(row),
        sandbox_url=url,
        domain=domain,
        privileged=row.privileged,
        exposed_port_protocol=row.exposed_port_protocol,
        enable_tcp_proxy=row.enable_tcp_proxy,
        idle_timeout=row.idle_timeout,
        delete_after_delay=row.delete_after_delay,
        delete_after_inactivity_delay=row.delete_after_inactivity_delay,
        enable_light_sleep=row.light_sleep,
        network=row.network or "none",  # type: ignore[arg-type]
        outbound_allowlist=row.outbound_allowlist,
        error=hide_host_paths(row.error or ""),
        secret=store.sandbox_secret(row) if with_secret else None,
    )


def token_out(row: ApiToken, token: str | None = None) -> TokenOut:
    return TokenOut(
        id=row.id,
        project=row.project,
        name=row.name,
        scope=row.scope or "normal",  # type: ignore[arg-type]
        created_at=_iso(row.created_at),
        revoked_at=_iso(row.revoked_at) if row.revoked_at else None,
        token=token,
    )


def quota_out(project: str, quota: ProjectQuota | None, used: Usage) -> QuotaOut:
    return QuotaOut(
        project=project,
        max_sandboxes=quota.max_sandboxes if quota else None,
        memory_mb=quota.memory_mb if quota else None,
        vcpu=quota.vcpu if quota else None,
        disk_mb=quota.disk_mb if quota else None,
        usage=QuotaUsage(
            sandboxes=used.sandboxes, memory_mb=used.memory_mb, vcpu=used.vcpu, disk_mb=used.disk_mb
        ),
    )


def secret_out(row: RegistrySecret) -> SecretOut:
    return SecretOut(
        name=row.name,
        type="registry",
        registry=row.host,
        username=row.username,
        created_at=_iso(row.created_at),
    )


def json_response(model: BaseModel, status: int = 200) -> Response:
    return Response(
        model.model_dump_json(exclude_none=False), status_code=status, media_type="application/json"
    )


def error_response(status: int, code: str, message: str, detail: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": hide_host_paths(message), "code": code}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read as it arrives and refused (413) past ``limit`` bytes: a declared
    ``Content-Length`` over it is refused before anything is read, a chunked body as soon as it
    grows over it."""
    too_large = ApiError(
        413, "body_too_large", f"request body too large: the limit is {limit} bytes"
    )
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    limit = getattr(request.app.state, "max_json_body", MAX_JSON_BODY)
    raw = await read_body(request, limit)
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "body"
            problems.append(f"{where}: {err['msg']}")
        raise ApiError(400, "invalid_request", "invalid request: " + "; ".join(problems)) from None


async def cancel_on_disconnect(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``work()``; cancel it if the client disconnects first (then return None). Its own
    exception, if any, is re-raised as is (not inside an exception group)."""
    result: Any = None
    error: BaseException | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        async def run() -> None:
            nonlocal result, error
            try:
                result = await work()
            except Exception as exc:
                error = exc
            finally:
                tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    if error is not None:
        raise error
    return result


# -- the app ----------------------------------------------------------------------------------


class Api:
    """Route handlers, bound to one server's state."""

    def __init__(self, config: ServerConfig, control: Control) -> None:
        self.config = config
        self.control = control
        self.store = control.store
        self.ports = Ports(config, control, self.principal)

    async def principal(self, request: Request) -> Principal:
        if via_admin_socket(request, self.config):
            project = request.headers.get("x-sandlot-project") or DEFAULT_PROJECT
            return Principal(project, admin=True)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing API token (Authorization: Bearer <token>)")
        row = await self.control.db(self.store.token_row, token.strip())
        if row is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API token")
        return Principal(row.project, admin=False, scope=row.scope or "normal")

    async def admin(self, request: Request) -> Principal:
        who = await self.principal(request)
        if not who.may_administer:
            raise ApiError(
                403,
                "forbidden",
                "tokens and quotas are managed on the server's Unix socket, or with a token "
                "with the 'admin' scope",
            )
        return who

    # -- sandboxes --

    async def create_sandbox(self, request: Request) -> Response:
        who = await self.principal(request)
        req = await parse_body(request, CreateSandbox)
        if req.image:
            try:
                image = self.config.image_trust.check(req.image, local=who.admin)
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
        base = _public_base(request, self.config)
        out = sandbox_out(row, base, self.store, True, self.config.domain)
        return json_response(out, 201)

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
        base = _public_base(request, self.config)
        domain = self.config.domain
        return json_response(
            SandboxList(sandboxes=[sandbox_out(r, base, self.store, False, domain) for r in rows])
        )

    async def get_sandbox(self, request: Request) -> Response:
        who = await self.principal(request)
        row = await self.control.get(who.project, request.path_params["sandbox_id"])
        base = _public_base(request, self.config)
        return json_response(sandbox_out(row, base, self.store, True, self.config.domain))

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
        base = _public_base(request, self.config)
        return json_response(sandbox_out(row, base, self.store, True))

    async def delete_sandbox(self, request: Request) -> Response:
        who = await self.principal(request)
        sandbox_id = request.path_params["sandbox_id"]
        with anyio.CancelScope(shield=True):  # a delete, once begun, completes
            await self.control.delete(who.project, sandbox_id)
        return json_response(DeletedOut(id=sandbox_id, status="deleted"))

    async def sandbox_events(self, request: Request) -> Response:
        who = await self.principal(request)
        rows = await self.control.events(who.project, request.path_params["sandbox_id"])
        return json_response(
            EventList(
                events=[
                    EventOut(at=_iso(e.at), kind=e.kind, detail=hide_host_paths(e.detail or ""))
                    for e in rows
                ]
            )
        )

    # -- tokens --

    async def create_token(self, request: Request) -> Response:
        await self.admin(request)
        req = await parse_body(request, CreateToken)
        row, token = await self.control.db(
            self.store.create_token, req.project, req.name, req.scope
        )
        return json_response(token_out(row, token), 201)

    async def list_tokens(self, request: Request) -> Response:
        await self.admin(request)
        project = request.query_params.get("project")
        rows = await self.control.db(self.store.list_tokens, project)
        return json_response(TokenList(tokens=[token_out(r) for r in rows]))

    async def revoke_token(self, request: Request) -> Response:
        await self.admin(request)
        token_id = request.path_params["token_id"]
        row = await self.control.db(self.store.revoke_token, token_id)
        if row is None:
            raise ApiError(404, "not_found", f"token {token_id} not found (or already revoked)")
        return json_response(token_out(row))

    # -- quotas --

    async def list_quotas(self, request: Request) -> Response:
        """Every project's quota and usage for an administrator; a token's own otherwise."""
        who = await self.principal(request)
        projects = [who.project]
        if who.may_administer:
            projects = await self.control.db(self.store.projects_in_use)
        out = [await self._quota(p) for p in projects]
        return json_response(QuotaList(quotas=out))

    async def get_quota(self, request: Request) -> Response:
        who = await self.principal(request)
        project = request.path_params["project"]
        if project != who.project and not who.may_administer:
            raise ApiError(403, "forbidden", "a token sees only its own project's quota")
        return json_response(await self._quota(project))

    async def set_quota(self, request: Request) -> Response:
        await self.admin(request)
        project = _project_param(request)
        req = await parse_body(request, SetQuota)
        await self.control.db(lambda: self.store.set_quota(project, **req.limits()))
        return json_response(await self._quota(project))

    async def delete_quota(self, request: Request) -> Response:
        await self.admin(request)
        project = _project_param(request)
        if not await self.control.db(self.store.delete_quota, project):
            raise ApiError(404, "not_found", f"project {project!r} has no quota")
        return json_response(await self._quota(project))

    async def _quota(self, project: str) -> QuotaOut:
        quota = await self.control.db(self.store.get_quota, project)
        used = await self.control.db(self.store.usage, project)
        return quota_out(project, quota, used)

    # -- registry secrets --

    async def create_secret(self, request: Request) -> Response:
        who = await self.principal(request)
        req = await parse_body(request, CreateSecret)
        row = await self.control.db(
            self.store.add_registry_secret,
            who.project,
            req.name,
            req.registry,
            req.username,
            req.password,
        )
        if row is None:
            raise ApiError(409, "conflict", f"a secret named {req.name!r} already exists")
        return json_response(secret_out(row), 201)

    async def list_secrets(self, request: Request) -> Response:
        who = await self.principal(request)
        rows = await self.control.db(self.store.list_registry_secrets, who.project)
        return json_response(SecretList(secrets=[secret_out(r) for r in rows]))

    async def delete_secret(self, request: Request) -> Response:
        who = await self.principal(request)
        name = request.path_params["name"]
        row = await self.control.db(self.store.delete_registry_secret, who.project, name)
        if row is None:
            raise ApiError(404, "not_found", f"secret {name!r} not found")
        return json_response(secret_out(row))

    # -- misc --

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
        return [
            ApiRoute(
                "GET", "/v1/health", self.health, "Server health", None, HealthOut, auth=False
            ),
            ApiRoute(
                "POST",
                "/v1/sandboxes",
                self.create_sandbox,
                "Create a sandbox",
                CreateSandbox,
                SandboxOut,
                status=201,
                errors=("503", "507"),  # the host has not enough left (admission)
            ),
            ApiRoute(
                "GET",
                "/v1/sandboxes",
                self.list_sandboxes,
                "List sandboxes (filters: name=, label=KEY=VALUE repeated)",
                None,
                SandboxList,
                query=["name", "label"],
            ),
            ApiRoute(
                "GET", sid, self.get_sandbox, "Get a sandbox (with its secret)", None, SandboxOut
            ),
            ApiRoute(
                "PATCH",
                sid,
                self.update_sandbox,
                "Update lifecycle fields and labels",
                UpdateSandbox,
                SandboxOut,
            ),
            ApiRoute("DELETE", sid, self.delete_sandbox, "Delete a sandbox", None, DeletedOut),
            ApiRoute(
                "GET",
                sid + "/events",
                self.sandbox_events,
                "A sandbox's history: created, slept, woke, deleted, error",
                None,
                EventList,
            ),
            ApiRoute(
                "POST",
                sid + "/ports",
                self.ports.expose,
                "Expose a port: served at {server}/sandboxes/{id}/ports/{port}/ (and "
                "{port}-{id}.{domain} with --domain); 409 on conflict when exclusive, or past "
                "the sandbox's limit of exposed ports (too_many_ports)",
                ExposePort,
                ExposedPortOut,
            ),
            ApiRoute(
                "DELETE",
                sid + "/ports",
                self.ports.unexpose,
                "Unexpose one port (?port=N; 404 if it is not exposed) or all of them",
                None,
                UnexposedOut,
                query=["port"],
            ),
            ApiRoute(
                "GET",
                sid + "/ports",
                self.ports.list_ports,
                "Exposed ports, the TCP proxy's address and the ports' domain",
                None,
                PortsOut,
            ),
            ApiRoute(
                "POST",
                "/v1/tokens",
                self.create_token,
                "Create an API token (Unix socket or admin scope)",
                CreateToken,
                TokenOut,
                status=201,
            ),
            ApiRoute(
                "GET",
                "/v1/tokens",
                self.list_tokens,
                "List API tokens (Unix socket or admin scope)",
                None,
                TokenList,
                query=["project"],
            ),
            ApiRoute(
                "DELETE",
                "/v1/tokens/{token_id}",
                self.revoke_token,
                "Revoke an API token (Unix socket or admin scope)",
                None,
                TokenOut,
            ),
            ApiRoute(
                "GET",
                "/v1/quotas",
                self.list_quotas,
                "Quotas and usage: every project's (admin) or the token's own",
                None,
                QuotaList,
            ),
            ApiRoute(
                "GET",
                "/v1/quotas/{project}",
                self.get_quota,
                "A project's quota and usage (a token: its own project only)",
                None,
                QuotaOut,
            ),
            ApiRoute(
                "PATCH",
                "/v1/quotas/{project}",
                self.set_quota,
                "Set a project's limits (omitted: unchanged; null: unlimited; admin only)",
                SetQuota,
                QuotaOut,
            ),
            ApiRoute(
                "DELETE",
                "/v1/quotas/{project}",
                self.delete_quota,
                "Remove a project's quota (admin only)",
                None,
                QuotaOut,
            ),
            ApiRoute(
                "POST",
                "/v1/secrets",
                self.create_secret,
                "Create a registry secret (for registry_secret=NAME)",
                CreateSecret,
                SecretOut,
                status=201,
            ),
            ApiRoute(
                "GET",
                "/v1/secrets",
                self.list_secrets,
                "List the project's secrets (never their passwords)",
                None,
                SecretList,
            ),
            ApiRoute(
                "DELETE",
                "/v1/secrets/{name}",
                self.delete_secret,
                "Delete a secret (sandboxes created with it keep running)",
                None,
                SecretOut,
            ),
            ApiRoute("GET", "/openapi.json", self.openapi, "This document", None, None, auth=False),
        ]


@dataclass(frozen=True)
class ApiRoute:
    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response]]
    summary: str
    request: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int = 200
    auth: bool = True
    query: list[str] | None = None
    #: Error statuses this route answers besides 400, 401 and 404.
    errors: tuple[str, ...] = ()


GATEWAY_PATH = "/sandboxes/{sandbox_id}/koyeb-sandbox/{path:path}"
GATEWAY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def openapi_document(routes: list[ApiRoute]) -> dict[str, Any]:
    components: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            components[name] = sub
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"content": {"application/json": {"schema": ref(ErrorOut)}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__}
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in _path_params(r.path)
        ]
        params += [
            {"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
            for q in r.query or []
        ]
        if params:
            op["parameters"] = params
        if r.request is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(r.request)}},
            }
        responses: dict[str, Any] = {}
        if r.response is not None:
            responses[str(r.status)] = {
                "description": "OK",
                "content": {"application/json": {"schema": ref(r.response)}},
            }
        else:
            responses[str(r.status)] = {"description": "OK"}
        if r.auth:
            # 429: the token's requests in flight
            for code in ("400", "401", "404", "429", *r.errors):
                responses.setdefault(code, {"description": "error", **error})
            op["security"] = [{"bearer": []}]
        op["responses"] = responses
        paths.setdefault(r.path, {})[r.method.lower()] = op
    gateway_path = GATEWAY_PATH.replace("{path:path}", "{path}")
    for method in GATEWAY_METHODS:
        paths.setdefault(gateway_path, {})[method.lower()] = {
            "summary": "The sandbox's agent API (Koyeb executor protocol), proxied; "
            "authenticated by the sandbox secret",
            "operationId": f"gateway_{method.lower()}",
            "parameters": [
                {
                    "name": "sandbox_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                },
                {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {"description": "the agent's answer"},
                "404": {"description": "no such sandbox", **error},
                "502": {"description": "agent not reachable", **error},
            },
        }
    paths.update(ports_openapi_paths(error))
    return {
        "openapi": "3.1.0",
        "info": {"title": "sandlot", "version": sandlot.__version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _project_param(request: Request) -> str:
    import re

    project: str = request.path_params["project"]
    if not re.match(PROJECT_PATTERN, project):
        raise ApiError(400, "invalid_request", f"invalid project name {project[:140]!r}")
    return project


def _path_params(path: str) -> list[str]:
    import re

    return re.findall(r"\{([a-z_]+)(?::[a-z]+)?\}", path)


def _wrap(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except Exception:
            # A bug, not bad input. Answered here rather than by Starlette's error middleware,
            # which re-raises so that the server then drops the keep-alive connection; and
            # never with the exception's text, which may hold host paths.
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, "internal", _INTERNAL)

    endpoint.__name__ = handler.__name__
    return endpoint


def create_app(config: ServerConfig) -> Starlette:
    store = Store(config.database_url, Path(config.key_file) if config.key_file else None)
    control = Control(
        store=store,
        engines=dict(config.engines),
        default_region=config.default_region,
        pool_sizes=dict(config.pools),
    )
    api = Api(config, control)
    routes: list[BaseRoute] = [
        Route(r.path, _wrap(r.handler), methods=[r.method]) for r in api.routes()
    ]
    routes.append(Route(GATEWAY_PATH, Gateway(control), methods=GATEWAY_METHODS))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await control.reconcile(config.stale_create_after)
        await control.lifecycle.load()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(control.lifecycle.run)
                if control.pools is not None:
                    tg.start_soon(control.pools.run)
                tg.start_soon(api.ports.run)
                tg.start_soon(AgentWatch(control, config.agent_probe).run)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            # Outside the cancelled task group, shielded: inside it, the first await of the
            # clean-up was cancelled (relays, proxies and the engine were not closed) and the
            # cancellation replaced any error that was on its way out.
            with anyio.CancelScope(shield=True):
                await api.ports.close()
                await control.close()

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, "not_found", f"no route for {request.method} {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(405, "method_not_allowed", f"{request.method} not allowed here")

    async def disk_full(request: Request, exc: Exception) -> Response:
        return error_response(507, "insufficient_storage", str(exc))

    async def internal(request: Request, exc: Exception) -> Response:
        return error_response(500, "internal", _INTERNAL)

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
    app.add_middleware(_PortsMiddleware, ports=api.ports)  # exposed ports' URLs first
    app.add_middleware(  # (added last: outermost)
        TokenRequestLimit, limit=config.token_requests, prefix=API_TOKEN_PREFIX
    )
    app.state.control = control
    app.state.api = api
    app.state.max_json_body = config.max_json_body
    app.state.h2_limits = config.h2_limits  # read by the HTTP/2 server (h2serve.limits_of)
    return app


def unix_public_url(socket_path: str) -> str:
    return "http+unix://" + quote(socket_path, safe="")


class _PortsMiddleware:
    """Exposed ports' URLs (path and host form) are answered by :mod:`.ports`."""

    def __init__(self, app: Any, ports: Ports) -> None:
        self.handle = ports.middleware(app)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.handle(scope, receive, send)
