"""The gateway: ``/sandboxes/{id}/koyeb-sandbox/{path}`` proxied to the sandbox's agent.

A raw ASGI app rather than a Starlette endpoint, because it needs three things the usual response
classes do not give: the request body streamed up as it arrives, the response streamed down
chunk by chunk (server-sent events reach the client as the agent produces them), and the
client's disconnect noticed even while no bytes flow -- it cancels the upstream request, so the
agent sees its client go and kills a streamed command.

The gateway checks the client's ``Authorization: Bearer <sandbox secret>`` itself (constant
time) before anything else happens, and passes it on (the agent checks it too). Only a request
that carries the secret is *activity* -- it wakes a sleeping sandbox and keeps it awake. The
agent's public routes (``/health``, ``/openapi.json``) answer without it, but then only while the
sandbox is awake and without counting: an unauthenticated request never wakes a sandbox nor keeps
it awake (a sleeping one answers 503 ``sandbox_sleeping``).

A request body of unknown length (chunked, or HTTP/2 without ``content-length``) is streamed on
chunked, never gathered; the agent bounds what it accepts.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from starlette.types import Receive, Scope, Send

from sandlot.server.control import agentwatch
from sandlot.server.control.control import Control
from sandlot.server.errors import API_TOKEN_PREFIX, WakeError
from sandlot.server.gateway.asgi import (
    HOP_BY_HOP_REQUEST,
    ClientGone,
    chunked,
    request_body,
    response_headers,
    send_json,
    stream_response_body,
    until_client_gone,
)
from sandlot.server.upstream import AgentPool, UpstreamError

#: Where the gateway is mounted (a Starlette route: ``path`` is the agent's route).
GATEWAY_PATH = "/sandboxes/{sandbox_id}/koyeb-sandbox/{path:path}"
GATEWAY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
#: What is not passed on to the agent (``host``: the agent's connection is its own).
_DROP_REQUEST = HOP_BY_HOP_REQUEST | {b"host"}
_TOKEN_PREFIX = API_TOKEN_PREFIX.encode()
#: Agent routes that need no secret (as in the agent's own PUBLIC_PATHS).
_PUBLIC_AGENT_PATHS = frozenset({"health", "openapi.json"})


class Gateway:
    def __init__(self, control: Control) -> None:
        self.control = control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sandbox_id: str = scope["path_params"]["sandbox_id"]
        pool = await self.control.agents.get(sandbox_id)
        if pool is None:
            failed = await agentwatch.unavailable(self.control, sandbox_id)
            if failed is not None:
                await send_json(send, *failed)
                return
            await send_json(
                send,
                404,
                {"error": f"sandbox {sandbox_id} not found", "code": "not_found"},
            )
            return
        public = scope["path_params"].get("path", "") in _PUBLIC_AGENT_PATHS
        if not _authenticated(scope, pool):
            # Refused before it counts as activity: a wrong secret must not wake a sandbox.
            if not public:
                await _unauthorized(send)
                return
            if not self.control.lifecycle.is_awake(sandbox_id):
                await send_json(
                    send,
                    503,
                    {
                        "error": f"sandbox {sandbox_id} is asleep; only a request with its "
                        "secret wakes it",
                        "code": "sandbox_sleeping",
                    },
                )
                return
            await self._proxy(scope, receive, send, sandbox_id)  # not activity
            return
        # The whole request is activity: it keeps the sandbox awake, and wakes it if asleep.
        try:
            async with self.control.lifecycle.activity(sandbox_id):
                await self._proxy(scope, receive, send, sandbox_id)
        except WakeError as exc:
            await send_json(send, 503, {"error": str(exc), "code": "wake_failed"})

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str) -> None:
        params = scope["path_params"]
        # Looked up again: waking from deep sleep starts a new agent (and a new pool).
        pool = await self.control.agents.get(sandbox_id)
        if pool is None:
            await send_json(
                send, 404, {"error": f"sandbox {sandbox_id} not found", "code": "not_found"}
            )
            return
        # The sandbox is untrusted: an API token sent here by mistake is not passed on to it.
        headers = [
            (k, v)
            for k, v in scope["headers"]
            if k not in _DROP_REQUEST
            and not (k == b"authorization" and v[7:].lstrip().startswith(_TOKEN_PREFIX))
        ]
        has_length = any(k == b"content-length" for k, _ in headers)
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        body_done = asyncio.Event()
        content: bytes | AsyncIterator[bytes]
        if not first.get("more_body", False):
            content = first.get("body", b"")
            headers = [(k, v) for k, v in headers if k != b"content-length"]
            body_done.set()
        elif has_length:
            content = request_body(first, receive, body_done)
        else:  # a body of unknown length stays chunked: streamed, never gathered
            headers.append((b"transfer-encoding", b"chunked"))
            content = chunked(request_body(first, receive, body_done))
        query = scope.get("query_string", b"")
        target = quote("/" + params.get("path", ""), safe="/%:@!$&'()*+,;=-._~")
        if query:
            target += "?" + query.decode("latin-1")

        # The client leaving closes the upstream connection: that is what tells the agent to
        # kill a streamed command.
        await until_client_gone(
            receive,
            body_done,
            self._forward(pool, scope["method"], target, headers, content, send, sandbox_id),
        )

    async def _forward(
        self,
        pool: AgentPool,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        content: bytes | AsyncIterator[bytes],
        send: Any,
        sandbox_id: str,
    ) -> None:
        try:
            upstream = await pool.request(method, target, headers, content)
        except ClientGone:
            return
        except UpstreamError as exc:
            if await self.control.agents.get(sandbox_id, fresh=True) is None:
                # Deleted meanwhile (perhaps by another replica; our cache was stale).
                await send_json(
                    send, 404, {"error": f"sandbox {sandbox_id} not found", "code": "not_found"}
                )
                return
            await send_json(
                send,
                502,
                {
                    "error": f"sandbox {sandbox_id}'s agent is not reachable: {exc}",
                    "code": "agent_unreachable",
                },
            )
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status,
                    "headers": response_headers(upstream.headers),
                }
            )
            # If the agent's stream breaks (sandbox deleted under an open stream), the error
            # propagates and the server aborts the connection: the client sees a truncated
            # response rather than a clean end that would pass for success.
            await stream_response_body(send, upstream.iter_body(), lambda: upstream.last_chunk_out)
        finally:
            upstream.close()


def _authenticated(scope: Scope, pool: AgentPool) -> bool:
    """Whether the request carries the sandbox's secret (compared in constant time). A pool
    whose secret is unknown authenticates nobody."""
    if pool.secret is None:
        return False
    given = b""
    for k, v in scope["headers"]:
        if k == b"authorization":
            given = v
    return hmac.compare_digest(given, b"Bearer " + pool.secret)


async def _unauthorized(send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"www-authenticate", b"Bearer"),
                (b"content-length", b"13"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"Unauthorized\n"})
