"""The requests every part of a sandbox handle makes: open the client (starting the local
server if needed), send, read an answer within its bound, map errors.

This file is the source of truth; ``src/sandlot/sdk/_sync/`` is generated from it by
``scripts/unasync.py`` (do not edit the sync twin by hand).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from sandlot.sdk._answers import raise_for_status, transport_error
from sandlot.sdk._autostart import async_ensure_local_server
from sandlot.sdk._connection import Connection, client_kwargs, control_headers, shared_ssl_context
from sandlot.sdk._limits import MAX_ANSWER_BYTES
from sandlot.sdk._primitives import async_uds_transport
from sandlot.sdk.errors import SandboxRequestError, SandboxServiceError


async def open_client(conn: Connection) -> httpx.AsyncClient:
    transport: httpx.AsyncBaseTransport
    if conn.unix_path is not None:
        if conn.autostart:
            await async_ensure_local_server(conn.unix_path)
        transport = async_uds_transport(conn.unix_path)
    else:
        transport = httpx.AsyncHTTPTransport(verify=shared_ssl_context())
    return httpx.AsyncClient(transport=transport, **client_kwargs(conn))


async def call(
    client: httpx.AsyncClient,
    conn: Connection,
    method: str,
    path: str,
    what: str,
    **kwargs: Any,
) -> Any:
    """One request to the server; the answer's JSON, or the SDK's exception for an error."""
    kwargs["headers"] = control_headers(conn, kwargs.get("headers"))
    response = await send(client, conn, method, path, what, **kwargs)
    raise_for_status(response, what)
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise SandboxServiceError(f"{what}: the answer is not JSON", response.status_code) from None


async def send(
    client: httpx.AsyncClient, conn: Connection, method: str, path: str, what: str, **kwargs: Any
) -> httpx.Response:
    """Send a request and read its answer, at most :data:`MAX_ANSWER_BYTES` of it."""
    try:
        response = await client.send(client.build_request(method, path, **kwargs), stream=True)
        try:
            return await read_answer(response, what)
        finally:
            await response.aclose()
    except httpx.HTTPError as exc:
        raise transport_error(exc, conn, what) from exc


async def read_answer(response: httpx.Response, what: str) -> httpx.Response:
    """``response`` with its body read -- a sandbox's agent answers through the server, and a
    hostile one must not be able to send the client an endless body: past
    :data:`MAX_ANSWER_BYTES` the read stops with :class:`SandboxServiceError`."""
    too_large = SandboxServiceError(
        f"{what}: the answer is larger than {MAX_ANSWER_BYTES} bytes", response.status_code
    )
    length = response.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > MAX_ANSWER_BYTES:
        raise too_large
    pieces: list[bytes] = []
    total = 0
    async for piece in response.aiter_bytes():
        total += len(piece)
        if total > MAX_ANSWER_BYTES:
            raise too_large
        pieces.append(piece)
    # The body is decoded already: the copy must not claim an encoding or a length.
    headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=b"".join(pieces), request=response.request
    )


def to_json(**fields: Any) -> bytes:
    try:
        return json.dumps(fields).encode()
    except (TypeError, ValueError) as exc:
        raise SandboxRequestError(f"invalid option: {exc}", 400) from None


def allowlist(entries: Sequence[str]) -> list[str]:
    # A lone string is a Sequence[str] too: "10.0.0.0/8" would become ten one-letter entries.
    if isinstance(entries, str):
        raise SandboxRequestError("outbound_allowlist must be a list of CIDRs", 400)
    return list(entries)


#: Request bodies go out in pieces of this size.
UPLOAD_CHUNK = 1 << 20


def check_limit(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SandboxRequestError(f"{name} must be a non-negative int, not {value!r}", 400)


async def in_pieces(data: bytes) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), UPLOAD_CHUNK):
        yield bytes(view[start : start + UPLOAD_CHUNK])
