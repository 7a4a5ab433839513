"""Who is asking. On the server's Unix socket the socket's file permissions are the
authentication: every request is the administrator's, acting in the project named by the
``X-Sandlot-Project`` header (``default`` without it). On TCP every control request needs
``Authorization: Bearer <API token>`` and sees only its token's project. A token's scope says
what else it may do: ``privileged`` tokens may create privileged sandboxes, ``admin`` tokens may
also manage tokens and quotas (of every project)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from sandlot.server.config import ServerConfig
from sandlot.server.control.control import Control
from sandlot.server.control.tables import DEFAULT_PROJECT
from sandlot.server.errors import ApiError


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


class Auth:
    """The principal of a request, from its socket or its API token."""

    def __init__(self, config: ServerConfig, control: Control) -> None:
        self.config = config
        self.control = control

    async def principal(self, request: Request) -> Principal:
        if via_admin_socket(request, self.config):
            project = request.headers.get("x-sandlot-project") or DEFAULT_PROJECT
            return Principal(project, admin=True)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing API token (Authorization: Bearer <token>)")
        row = await self.control.db(self.control.store.token_row, token.strip())
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
