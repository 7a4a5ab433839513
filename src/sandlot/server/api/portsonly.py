"""The ports-only listener: a TCP address that serves sandboxes' exposed ports and nothing else.

Why: a server that listens only on its Unix socket (the embedded default the SDK starts) would
hand out exposed-port URLs like ``http+unix://%2Ftmp%2F...sock/sandboxes/ID/ports/8080/``,
which no browser, curl or urllib opens. With ``--ports-listen`` (on by default for a Unix-socket
server, on 127.0.0.1) the same ports are also served at ``http://127.0.0.1:PORT/...``.

What it must not do: on the Unix socket, the socket's file permissions are the authentication
and every request is its owner's. A TCP port on loopback is reachable by every local user, so
requests that come in on it never reach the control API or a sandbox's agent (both 404 here);
they reach exposed ports only, which are public unless the sandbox has ``protect_ports`` (then
each port's token is asked for, as on any listener). The ASGI server names the socket a
connection was accepted on (``scope["server"]``); a client cannot choose it.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send


class PortsOnly:
    """ASGI middleware: requests on ``address`` go to ``ports_app`` (the exposed-ports router,
    whose fall-through is a 404 here); all others to ``app``."""

    def __init__(self, app: ASGIApp, address: tuple[str, int], ports_app: ASGIApp) -> None:
        self.app = app
        self.address = address
        self.ports_app = ports_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] in ("http", "websocket") and _same_address(server, self.address):
            await self.ports_app(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _same_address(server: object, address: tuple[str, int]) -> bool:
    if not isinstance(server, tuple | list) or len(server) < 2:
        return False
    return server[1] == address[1] and str(server[0]) == address[0]


async def not_a_port(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer to anything but an exposed port's URL on the ports-only listener."""
    message = "this address serves sandboxes' exposed ports only"
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message})
        return
    body = json.dumps({"error": message, "code": "not_found"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
