"""TCP tunnels to ports inside the sandbox, for the gateway.

``GET /tunnel?port=8080`` with ``Connection: Upgrade`` and ``Upgrade: tcp`` answers
``101 Switching Protocols`` once the agent has connected to ``127.0.0.1:8080`` inside the
sandbox, then relays raw bytes both ways (half-closes included) until both sides are done.
This is how a gateway outside the sandbox reaches a port in a network namespace that has
nothing but loopback: through the agent's own socket.

Over a Unix socket the gateway asks for the connection itself (``Sandlot-Tunnel: fd``): the agent
connects, answers ``200`` with the connected socket attached (SCM_RIGHTS) and is done. The
gateway then talks to the port directly, as if it were inside the sandbox's network namespace:
one hop less on every byte, and no agent threads, memory or pids spent per open connection --
the sandbox's own limits stay the sandbox's. Over TCP (no fd passing), and in gVisor sandboxes,
the agent relays: all tunnels in one thread (relay_loop.py).
"""

from __future__ import annotations

import os
import socket

from sandlot.agent.http11 import HTTPError, Request
from sandlot.agent.relay_loop import RELAY

CONNECT_TIMEOUT = 5.0


def _port(value: str | None) -> int:
    if value is None or not value.isdigit() or not 1 <= int(value) <= 65535:
        raise HTTPError(400, "'port' must be a port number (1-65535)")
    return int(value)


#: Off in gVisor sandboxes (``SANDLOT_TUNNEL_FD=0``, set by the engine): their sockets live in
#: gVisor's network stack, and one passed to the host is no TCP socket there; the agent relays.
FD_HANDOVER = os.environ.get("SANDLOT_TUNNEL_FD", "1") != "0"


def open_tunnel(req: Request) -> None:
    port = _port(req.query.get("port"))
    upgrade = {t.strip().lower() for t in req.headers.get("upgrade", "").split(",")}
    connection = {t.strip().lower() for t in req.headers.get("connection", "").split(",")}
    if "tcp" not in upgrade or "upgrade" not in connection:
        raise HTTPError(426, "this route needs 'Connection: Upgrade' and 'Upgrade: tcp'")
    if req.declared_length:
        raise HTTPError(400, "a tunnel request has no body")
    try:
        target = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise HTTPError(502, f"cannot connect to port {port}: {exc.strerror or exc}") from None
    target.settimeout(None)
    # Small writes (HTTP/2 frames, WebSocket messages) go out at once, not after a delayed ACK.
    target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if (
        req.headers.get("sandlot-tunnel", "").strip().lower() == "fd"
        and req.conn.sock.family == socket.AF_UNIX
        and FD_HANDOVER
    ):
        with target:
            req.respond_with_fd(200, {"Sandlot-Tunnel": "fd"}, target.fileno())
        return
    conn = req.upgrade({"Connection": "Upgrade", "Upgrade": "tcp"})
    client, client_sent = conn.detach()
    RELAY.add(client, client_sent, target)
