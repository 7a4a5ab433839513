"""The administration routes: API tokens and quotas (the socket's owner or an admin token),
and a project's registry secrets."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response

from sandlot.server.api.handlers import Handlers
from sandlot.server.api.http import json_response, parse_body
from sandlot.server.errors import ApiError
from sandlot.server.schemas import (
    PROJECT_PATTERN,
    CreateSecret,
    CreateToken,
    QuotaList,
    QuotaOut,
    SecretList,
    SetQuota,
    TokenList,
)


class AdminHandlers(Handlers):
    async def create_token(self, request: Request) -> Response:
        await self.admin(request)
        req = await parse_body(request, CreateToken)
        row, token = await self.control.db(
            self.store.create_token, req.project, req.name, req.scope
        )
        return json_response(self.render.token(row, token), 201)

    async def list_tokens(self, request: Request) -> Response:
        await self.admin(request)
        project = request.query_params.get("project")
        rows = await self.control.db(self.store.list_tokens, project)
        return json_response(TokenList(tokens=[self.render.token(r) for r in rows]))

    async def revoke_token(self, request: Request) -> Response:
        await self.admin(request)
        token_id = request.path_params["token_id"]
        row = await self.control.db(self.store.revoke_token, token_id)
        if row is None:
            raise ApiError(404, "not_found", f"token {token_id} not found (or already revoked)")
        return json_response(self.render.token(row))

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
        return self.render.quota(project, quota, used)

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
        return json_response(self.render.secret(row), 201)

    async def list_secrets(self, request: Request) -> Response:
        who = await self.principal(request)
        rows = await self.control.db(self.store.list_registry_secrets, who.project)
        return json_response(SecretList(secrets=[self.render.secret(r) for r in rows]))

    async def delete_secret(self, request: Request) -> Response:
        who = await self.principal(request)
        name = request.path_params["name"]
        row = await self.control.db(self.store.delete_registry_secret, who.project, name)
        if row is None:
            raise ApiError(404, "not_found", f"secret {name!r} not found")
        return json_response(self.render.secret(row))


def _project_param(request: Request) -> str:
    project: str = request.path_params["project"]
    if not re.match(PROJECT_PATTERN, project):
        raise ApiError(400, "invalid_request", f"invalid project name {project[:140]!r}")
    return project
