"""The gateway: ``/sandboxes/{id}/koyeb-sandbox/{path}`` proxied to the sandbox's agent.

A raw ASGI app rather than a Starlette endpoint, because it needs three things the usual response
classes do not give: the request body streamed up as it arrives, the response streamed down
chunk by chunk (server-sent events reach the client as the agent produces them), and the
client's disconnect noticed even while no bytes flow -- it cancels the upstream request, so the
agent sees its client go and kills a streamed command.

The client's ``Authorization: Bearer <sandbox secret>`` is passed through; the agent checks it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx

from sandlot.server.control import Control

Scope = dict[str, Any]
Message = dict[str, Any]

#: Hop-by-hop headers (RFC 9110 §7.6.1) and ones the proxy sets itself.
_DROP_REQUEST = {
    b"host",
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authorization",
}
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "trailer", "upgrade"}


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class Gateway:
    def __init__(self, control: Control) -> None:
        self.control = control

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        params = scope["path_params"]
        sandbox_id: str = params["sandbox_id"]
        client = await self.control.agent_for(sandbox_id)
        if client is None:
            await _send_json(
                send,
                404,
                {"error": f"sandbox {sandbox_id} not found", "code": "not_found"},
            )
            return
        headers = [(k, v) for k, v in scope["headers"] if k not in _DROP_REQUEST]
        has_length = any(k == b"content-length" for k, _ in headers)
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        body_done = anyio.Event()
        content: bytes | AsyncIterator[bytes]
        if not first.get("more_body", False):
            content = first.get("body", b"")
            body_done.set()
        elif has_length:
            content = _body_stream(first, receive, body_done)
        else:
            # Chunked upload without a length: the agent (a stdlib HTTP server) needs one,
            # so gather the body first.
            try:
                content = b"".join([c async for c in _body_stream(first, receive, body_done)])
            except _ClientGone:
                return
            headers.append((b"content-length", str(len(content)).encode()))
        path = "/" + params.get("path", "")
        query = scope.get("query_string", b"")
        request = client.build_request(
            scope["method"],
            path + ("?" + query.decode("latin-1") if query else ""),
            headers=headers,
            content=content,
        )
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                await body_done.wait()
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_disconnect)
            await self._forward(client, request, send, sandbox_id)
            tg.cancel_scope.cancel()

    async def _forward(
        self, client: httpx.AsyncClient, request: httpx.Request, send: Any, sandbox_id: str
    ) -> None:
        try:
            upstream = await client.send(request, stream=True)
        except _ClientGone:
            return
        except (httpx.TransportError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            await _send_json(
                send,
                502,
                {
                    "error": f"sandbox {sandbox_id}'s agent is not reachable: {reason}",
                    "code": "agent_unreachable",
                },
            )
            return
        try:
            response_headers = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in upstream.headers.multi_items()
                if k.lower() not in _DROP_RESPONSE
            ]
            if "text/event-stream" in upstream.headers.get("content-type", ""):
                # Tell any proxy in front of us not to buffer the stream either.
                response_headers.append((b"x-accel-buffering", b"no"))
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status_code,
                    "headers": response_headers,
                }
            )
            # If the agent's stream breaks (sandbox deleted under an open stream), the exception
            # propagates and the server aborts the connection: the client sees a truncated
            # response rather than a clean end that would pass for success.
            async for chunk in upstream.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()


class _ClientGone(Exception):
    """The client disconnected while sending its request body."""


async def _body_stream(first: Message, receive: Any, done: anyio.Event) -> AsyncIterator[bytes]:
    message = first
    while True:
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            done.set()
            return
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
