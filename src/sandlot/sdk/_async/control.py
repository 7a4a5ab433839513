"""AsyncControlClient: the control API beside the sandboxes -- tokens, quotas, registry
secrets, a sandbox's history and the server's health. It is what ``sandlot token``,
``sandlot quota``, ``sandlot secret`` and ``sandlot events`` use.

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, cast
from urllib.parse import quote

import httpx

from sandlot.sdk._async.calls import call, open_client, to_json
from sandlot.sdk._connection import Connection, resolve_connection
from sandlot.sdk.errors import SandboxServiceError
from sandlot.sdk.types import QuotaInfo, SandboxEvent, SecretInfo, ServerHealth, TokenInfo

#: An omitted limit (None is a value: unlimited).
_UNSET: Any = object()


def _segment(value: str) -> str:
    """One path segment: an id holding ``/`` or ``..`` must not reach another route."""
    return quote(str(value), safe="")


def _items(data: Any, key: str, what: str) -> list[Any]:
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise SandboxServiceError(f"{what}: the answer has no {key!r} list")
    return items


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SandboxServiceError(f"{what}: the answer is not a JSON object")
    return data


class AsyncControlClient:
    """The control API of a sandlot server (not the sandboxes: see ``AsyncSandbox``).

    ``api_url`` and ``api_token`` work as for ``AsyncSandbox.create`` (arguments, then
    ``SANDLOT_URL``/``SANDLOT_API_TOKEN``, else the local server, started if needed). Tokens
    and other projects' quotas need the Unix socket or an admin-scope token. Errors are the
    SDK's (:mod:`sandlot.sdk.errors`). ``async with AsyncControlClient() as control:`` closes
    its connections on exit (or call :meth:`aclose`)."""

    def __init__(self, api_url: str | None = None, api_token: str | None = None) -> None:
        self._conn: Connection = resolve_connection(api_url, api_token)
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> AsyncControlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release the connections (a later call opens new ones)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _call(self, method: str, path: str, what: str, body: Any = None, **kw: Any) -> Any:
        if self._client is None:
            self._client = await open_client(self._conn)
        if body is not None:
            kw["content"] = to_json(**body)
            kw["headers"] = {"content-type": "application/json"}
        return await call(self._client, self._conn, method, path, what, **kw)

    # -- the server -------------------------------------------------------------------------------

    async def health(self) -> ServerHealth:
        """``{status, version, regions}`` (on the Unix socket also ``build``, ``package`` and
        ``pid`` of the serving installation). Needs no token."""
        data = await self._call("GET", "/v1/health", "server health")
        return cast(ServerHealth, _object(data, "server health"))

    async def sandbox_events(self, sandbox_id: str) -> list[SandboxEvent]:
        """A sandbox's history, oldest first (readable after its deletion)."""
        what = f"get events of sandbox {sandbox_id}"
        data = await self._call("GET", f"/v1/sandboxes/{_segment(sandbox_id)}/events", what)
        return cast(list[SandboxEvent], _items(data, "events", what))

    # -- tokens -----------------------------------------------------------------------------------

    async def create_token(
        self, project: str = "default", name: str = "", scope: str = "normal"
    ) -> TokenInfo:
        """A new API token for ``project``; its value is in ``["token"]``, shown this once.
        ``scope``: ``normal`` (the project's sandboxes), ``privileged`` (also privileged
        sandboxes) or ``admin`` (also tokens and every project's quotas)."""
        body = {"project": project, "name": name, "scope": scope}
        data = await self._call("POST", "/v1/tokens", "create token", body)
        return cast(TokenInfo, _object(data, "create token"))

    async def list_tokens(self, project: str | None = None) -> list[TokenInfo]:
        """Tokens (never their values), of one project or of all."""
        params = {"project": project} if project else {}
        data = await self._call("GET", "/v1/tokens", "list tokens", params=params)
        return cast(list[TokenInfo], _items(data, "tokens", "list tokens"))

    async def revoke_token(self, token_id: str) -> TokenInfo:
        """Revoke a token: it stops working at once."""
        data = await self._call("DELETE", f"/v1/tokens/{_segment(token_id)}", "revoke token")
        return cast(TokenInfo, _object(data, "revoke token"))

    # -- quotas -----------------------------------------------------------------------------------

    async def list_quotas(self) -> list[QuotaInfo]:
        """Limits and usage: every project's (admin) or the token's own project's."""
        data = await self._call("GET", "/v1/quotas", "list quotas")
        return cast(list[QuotaInfo], _items(data, "quotas", "list quotas"))

    async def get_quota(self, project: str) -> QuotaInfo:
        """One project's limits and usage (a token: its own project only)."""
        data = await self._call("GET", f"/v1/quotas/{_segment(project)}", "get quota")
        return cast(QuotaInfo, _object(data, "get quota"))

    async def set_quota(
        self,
        project: str,
        *,
        max_sandboxes: int | None = _UNSET,
        memory_mb: int | None = _UNSET,
        vcpu: float | None = _UNSET,
        disk_mb: int | None = _UNSET,
    ) -> QuotaInfo:
        """Set a project's limits: omitted ones stay as they are, ``None`` removes one
        (unlimited). Admin only."""
        given = {
            "max_sandboxes": max_sandboxes,
            "memory_mb": memory_mb,
            "vcpu": vcpu,
            "disk_mb": disk_mb,
        }
        body = {k: v for k, v in given.items() if v is not _UNSET}
        data = await self._call("PATCH", f"/v1/quotas/{_segment(project)}", "set quota", body)
        return cast(QuotaInfo, _object(data, "set quota"))

    async def delete_quota(self, project: str) -> QuotaInfo:
        """Remove a project's quota (no limits). Admin only."""
        data = await self._call("DELETE", f"/v1/quotas/{_segment(project)}", "remove quota")
        return cast(QuotaInfo, _object(data, "remove quota"))

    # -- registry secrets -------------------------------------------------------------------------

    async def create_secret(
        self, name: str, registry: str, username: str, password: str
    ) -> SecretInfo:
        """Store registry credentials under ``name`` (for ``create(registry_secret=name)``)."""
        body = {"name": name, "registry": registry, "username": username, "password": password}
        data = await self._call("POST", "/v1/secrets", "create secret", body)
        return cast(SecretInfo, _object(data, "create secret"))

    async def list_secrets(self) -> list[SecretInfo]:
        """The project's registry secrets (never their passwords)."""
        data = await self._call("GET", "/v1/secrets", "list secrets")
        return cast(list[SecretInfo], _items(data, "secrets", "list secrets"))

    async def delete_secret(self, name: str) -> SecretInfo:
        """Delete a secret (sandboxes created with it keep running)."""
        data = await self._call("DELETE", f"/v1/secrets/{_segment(name)}", "delete secret")
        return cast(SecretInfo, _object(data, "delete secret"))
