"""Protected ports' tokens as a client gives them: ``Authorization: Bearer``, the
``?sandlot_token=`` query parameter, or the cookie the host form sets. One parser finds the token
and removes it, so that what is taken as the token is never passed on to the sandbox."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from starlette.types import Scope

from sandlot.server.gateway.asgi import header

TOKEN_PARAM = "sandlot_token"
TOKEN_COOKIE = "sandlot_port_token"


def given_token(scope: Scope, query: str) -> tuple[str | None, str, bool]:
    """The port token the client gave (header, query or cookie), the query without it, and
    whether it came from the query."""
    auth = header(scope, b"authorization")
    if auth is not None and auth[:7].lower() == b"bearer ":
        return auth[7:].strip().decode("latin-1"), query, False
    if TOKEN_PARAM in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        given = next((v for k, v in pairs if k == TOKEN_PARAM), None)
        rest = urlencode([(k, v) for k, v in pairs if k != TOKEN_PARAM])
        return given, rest, True
    for k, v in scope["headers"]:
        if k == b"cookie":
            token, _ = token_cookie(v)
            if token is not None:
                return token, query, False
    return None, query, False


def token_cookie(value: bytes) -> tuple[str | None, bytes]:
    """The port token's cookie in a ``Cookie`` header, and the header without it. One parser
    for both, so that whatever is taken as the token is also what is removed (a lenient
    cookie parser once read ``sandlot_port_token =T`` that the stripping did not match)."""
    token: str | None = None
    kept: list[bytes] = []
    for part in value.split(b";"):
        name, _, rest = part.partition(b"=")
        if name.strip() == TOKEN_COOKIE.encode():
            token = rest.strip().strip(b'"').decode("latin-1")
        elif part.strip():
            kept.append(part.strip())
    return token, b"; ".join(kept)
