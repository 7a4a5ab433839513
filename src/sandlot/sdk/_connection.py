"""Where the server is and how to talk to it: the connection's settings (arguments, then
``SANDLOT_URL``/``SANDLOT_API_TOKEN``, then the local server's socket), the httpx client's
settings, and the control API's headers."""

from __future__ import annotations

import dataclasses
import functools
import os
import ssl
from typing import Any
from urllib.parse import urlsplit

import httpx

from sandlot.paths import default_server_socket
from sandlot.sdk.errors import MissingApiTokenError


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where the server is and how to authenticate to it."""

    #: ``http(s)://host:port`` for TCP, or None for a Unix socket.
    base_url: str
    unix_path: str | None
    api_token: str | None
    #: True when this is the default local server, which the SDK starts if needed.
    autostart: bool

    @property
    def description(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else self.base_url


def resolve_connection(api_url: str | None, api_token: str | None) -> Connection:
    """Arguments win over ``SANDLOT_URL`` / ``SANDLOT_API_TOKEN``; with neither, the default
    local server on its Unix socket."""
    url = api_url or os.environ.get("SANDLOT_URL") or None
    token = api_token or os.environ.get("SANDLOT_API_TOKEN") or None
    if url is None:
        return Connection("http://sandlot", str(default_server_socket()), token, autostart=True)
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"invalid api_url {url!r}: expected unix:/path/to/sandlot.sock")
        return Connection("http://sandlot", path, token, autostart=False)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"invalid api_url {url!r}: expected http(s)://host:port or unix:/path/to.sock"
        )
    if token is None:
        raise MissingApiTokenError(
            f"the sandlot server at {url} needs an API token: pass api_token= or set "
            "SANDLOT_API_TOKEN (create one with `sandlot token create` on the server)"
        )
    return Connection(url.rstrip("/"), None, token, autostart=False)


def connection_arguments(conn: Connection) -> tuple[str | None, str | None]:
    """The ``api_url`` and ``api_token`` that resolve to ``conn`` again (for a handle that
    makes another one: a snapshot's spawn, a sandbox's fork)."""
    if conn.autostart:
        return None, conn.api_token
    return (f"unix:{conn.unix_path}" if conn.unix_path else conn.base_url), conn.api_token


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context per process. Building one loads the CA bundle (~20 ms here), and each
    httpx transport would otherwise build its own: that was most of a warm-pool create."""
    return ssl.create_default_context()


def client_kwargs(conn: Connection) -> dict[str, Any]:
    """Keyword arguments for httpx.Client / httpx.AsyncClient (the transport is added by the
    caller, which knows which of the two it builds). No default Authorization header: the API
    token goes only on control requests (:func:`control_headers`), never to a sandbox."""
    headers = {"user-agent": "sandlot-python"}
    return {
        "base_url": conn.base_url,
        "headers": headers,
        "timeout": httpx.Timeout(60.0, connect=10.0),
    }


def control_headers(conn: Connection, headers: dict[str, str] | None) -> dict[str, str]:
    """Headers of a request to the control API: the API token unless the caller set one."""
    merged = dict(headers or {})
    if conn.api_token and "authorization" not in merged:
        merged["authorization"] = f"Bearer {conn.api_token}"
    return merged
