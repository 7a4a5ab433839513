"""WebSockets to an exposed port relayed message by message: the fallback when the server in
front is not sandlot's own runner (which passes the bytes through, see
:mod:`sandlot.server.runner.protocols`). The client's handshake is replayed to the sandbox's
server through a tunnel, its subprotocol choice passed back."""

from __future__ import annotations

import contextlib
import re
import socket

import anyio
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Origin, Subprotocol

from sandlot.server.gateway.asgi import header, refuse_websocket
from sandlot.server.gateway.ports.forward import Forward
from sandlot.server.gateway.tunnel import TunnelError, open_tunnel_socket
from sandlot.server.upstream import AgentPool

#: The largest WebSocket message relayed message by message (the fallback under other servers).
WS_MESSAGE_MAX = 16 * 1024 * 1024


async def relay_websocket(
    agent: AgentPool, fwd: Forward, scope: Scope, receive: Receive, send: Send
) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    try:
        sock = await open_tunnel_socket(agent.address, agent.secret, fwd.port)
    except TunnelError as exc:
        await refuse_websocket(scope, send, 502, fwd.bad_gateway(exc))
        return
    host = (header(scope, b"host") or b"sandbox").decode("latin-1")
    if not re.fullmatch(r"[A-Za-z0-9.:\[\]_-]{1,255}", host):
        host = "sandbox"
    path = fwd.target_path(scope)
    if fwd.query:
        path += "?" + fwd.query
    keep = {b"cookie", b"authorization", b"user-agent", b"accept-language"}
    extra = [(k.decode(), v.decode("latin-1")) for k, v in fwd.headers(scope) if k in keep]
    origin = header(scope, b"origin")
    try:
        upstream = await connect(
            f"ws://{host}{path}",
            sock=sock,
            unix=sock.family == socket.AF_UNIX,
            origin=Origin(origin.decode("latin-1")) if origin else None,
            subprotocols=[Subprotocol(p) for p in scope.get("subprotocols") or []],
            additional_headers=extra,
            user_agent_header=None,
            compression=None,
            # What the sandbox's server sends is held whole per message here: bounded like
            # uvicorn bounds the client's side (16 MiB; larger: closed with 1009).
            max_size=WS_MESSAGE_MAX,
            ping_interval=None,
            proxy=None,
            open_timeout=10,
        )
    except InvalidStatus as exc:
        sock.close()
        await refuse_websocket(
            scope,
            send,
            exc.response.status_code,
            {
                "error": f"port {fwd.port}: the sandbox's server refused the WebSocket "
                f"(HTTP {exc.response.status_code})",
                "code": "websocket_refused",
                "port": fwd.port,
            },
        )
        return
    except (InvalidHandshake, OSError, TimeoutError) as exc:
        sock.close()
        await refuse_websocket(scope, send, 502, fwd.bad_gateway(exc))
        return
    await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
    async with upstream, anyio.create_task_group() as tg:

        async def client_to_sandbox() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "websocket.disconnect":
                    with contextlib.suppress(ConnectionClosed):
                        await upstream.close(code=_close_code(msg.get("code", 1000)))
                    break
                if msg.get("bytes") is not None:
                    await upstream.send(msg["bytes"])
                elif msg.get("text") is not None:
                    await upstream.send(msg["text"])
            tg.cancel_scope.cancel()

        async def sandbox_to_client() -> None:
            try:
                async for data in upstream:
                    if isinstance(data, bytes):
                        await send({"type": "websocket.send", "bytes": data})
                    else:
                        await send({"type": "websocket.send", "text": data})
            except ConnectionClosed:
                pass
            code = upstream.close_code or 1000
            with contextlib.suppress(OSError, RuntimeError):
                await send({"type": "websocket.close", "code": _close_code(code)})
            tg.cancel_scope.cancel()

        tg.start_soon(client_to_sandbox)
        tg.start_soon(sandbox_to_client)


def _close_code(code: int) -> int:
    # Codes a peer may not send on the wire (1005, 1006, 1015) become a normal closure.
    return 1000 if code in (1005, 1006, 1015) or not 1000 <= code <= 4999 else code
