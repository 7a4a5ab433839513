"""HTTP requests to an exposed port: the request body streamed up as it arrives, the response
streamed back with backpressure; an HTTP/2 port's trailers passed on when the client's server
offers ASGI's trailers extension. The client leaving cancels the exchange (and closes the
tunnel, which is how the sandbox's server learns it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.types import Receive, Scope, Send

from sandlot.server.gateway.asgi import (
    ClientGone,
    chunked,
    header,
    request_body,
    response_headers,
    send_json,
    stream_response_body,
    until_client_gone,
)
from sandlot.server.gateway.h2upstream import H2PortPool, H2Response
from sandlot.server.gateway.ports.forward import DROP_RESPONSE, Forward, PortPool
from sandlot.server.upstream import UpstreamError, UpstreamResponse


async def forward_http(
    pool: PortPool | H2PortPool,
    fwd: Forward,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    headers = fwd.headers(scope)
    h2 = isinstance(pool, H2PortPool)
    if h2 and (header(scope, b"te") or b"").strip().lower() == b"trailers":
        headers.append((b"te", b"trailers"))  # what gRPC servers insist on
    first = await receive()
    if first["type"] == "http.disconnect":
        return
    body_done = asyncio.Event()
    content: bytes | AsyncIterator[bytes]
    length = header(scope, b"content-length")
    if not first.get("more_body", False):
        content = first.get("body", b"")
        body_done.set()
    elif length is not None:
        headers.append((b"content-length", length))
        content = request_body(first, receive, body_done)
    elif h2:  # HTTP/2 frames the body itself
        content = request_body(first, receive, body_done)
    else:  # a chunked upload stays chunked (streamed, never gathered)
        headers.append((b"transfer-encoding", b"chunked"))
        content = chunked(request_body(first, receive, body_done))
    target = fwd.target_path(scope)
    if fwd.query:
        target += "?" + fwd.query
    # The client leaving cancels the exchange, which closes the tunnel: that is how the
    # sandbox's server learns it (an idle stream would otherwise hold it forever).
    trailers = "http.response.trailers" in (scope.get("extensions") or {})
    await until_client_gone(
        receive,
        body_done,
        _exchange(pool, fwd, scope["method"], target, headers, content, send, trailers),
    )


async def _exchange(
    pool: PortPool | H2PortPool,
    fwd: Forward,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    content: bytes | AsyncIterator[bytes],
    send: Send,
    trailers: bool = False,
) -> None:
    """One request to the port and its response streamed back. With ``trailers`` (the
    client's server offers ASGI's trailers extension) and an HTTP/2 port, the response's
    trailers are passed on (gRPC's status travels there)."""
    try:
        upstream: UpstreamResponse | H2Response = await pool.request(
            method, target, headers, content
        )
    except ClientGone:
        return
    except UpstreamError as exc:
        await send_json(send, 502, fwd.bad_gateway(exc))
        return
    try:
        out = response_headers(upstream.headers, DROP_RESPONSE)
        if fwd.set_cookie is not None:
            out.append((b"set-cookie", fwd.set_cookie))
        with_trailers = trailers and isinstance(upstream, H2Response)
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": out,
                "trailers": with_trailers,
            }
        )
        # A server that breaks off mid-response: the error propagates and the connection is
        # aborted, so the client sees a truncated response, not one that passes for whole.
        await stream_response_body(
            send,
            upstream.iter_body(),
            lambda: isinstance(upstream, UpstreamResponse) and upstream.last_chunk_out,
        )
        if with_trailers:
            tail = upstream.trailers if isinstance(upstream, H2Response) else []
            await send({"type": "http.response.trailers", "headers": tail, "more_trailers": False})
    finally:
        upstream.close()
