"""The server's answers as the SDK's exceptions: an HTTP error status, or a transport
failure, becomes the matching class of :mod:`sandlot.sdk.errors`."""

from __future__ import annotations

from typing import Any

import httpx

from sandlot.sdk._connection import Connection
from sandlot.sdk.errors import (
    InvalidPortError,
    SandboxError,
    SandboxNotFoundError,
    SandboxRequestError,
    SandboxServiceError,
    SandboxTimeoutError,
    UnsupportedFeatureError,
)


def error_message(body: Any, fallback: str) -> str:
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
    if isinstance(body, str) and body.strip():
        return body.strip()
    return fallback


def raise_for_status(response: httpx.Response, what: str) -> None:
    """Map an HTTP error answer to the SDK's exceptions. ``response`` must have been read."""
    status = response.status_code
    if status < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    message = f"{what}: {error_message(body, f'HTTP {status}')}"
    code = body.get("code") if isinstance(body, dict) else None
    if status == 404 and code == "not_found":
        raise SandboxNotFoundError(message, status, body)
    if status == 501 or code == "unsupported":
        raise UnsupportedFeatureError(message)
    if status == 504 or code == "timeout":
        raise SandboxTimeoutError(message)
    if 400 <= status < 500:
        raise SandboxRequestError(message, status, body)
    raise SandboxServiceError(message, status, body)


def sandboxes_in(data: Any, what: str) -> list[dict[str, Any]]:
    """The ``sandboxes`` list of an answer (list, fork), each with an id; a malformed answer is a
    :class:`SandboxServiceError`, never a KeyError from deep inside the SDK."""
    items = data.get("sandboxes") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(
        isinstance(item, dict) and isinstance(item.get("id"), str) for item in items
    ):
        raise SandboxServiceError(f"{what}: the server's answer is not a list of sandboxes")
    return items


def transport_error(exc: Exception, conn: Connection, what: str) -> SandboxError:
    if isinstance(exc, httpx.TimeoutException):
        return SandboxTimeoutError(f"{what}: timed out talking to {conn.description}")
    return SandboxServiceError(
        f"{what}: cannot reach the sandlot server at {conn.description}: "
        f"{exc or type(exc).__name__}"
    )


def check_port(port: Any) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidPortError(f"port must be an int between 1 and 65535, not {port!r}")
    return port
