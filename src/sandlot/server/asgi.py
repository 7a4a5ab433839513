"""Raw ASGI helpers shared by the two proxies (the agent gateway and the exposed ports): both
stream request bodies up as they arrive and answer errors as small JSON documents."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected while sending its request body."""


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
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


async def request_body(first: Message, receive: Receive, done: anyio.Event) -> AsyncIterator[bytes]:
    """The request body as it arrives, starting from the already-received ``first`` message;
    ``done`` is set once it is complete (so a watcher may then wait for the disconnect)."""
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
            raise ClientGone
