"""The ports-only listener's socket (``--ports-listen``): which address, and binding it so that
exposed URLs survive a restart. What it serves is decided in :mod:`sandlot.server.api.portsonly`.

Why it exists: a server on its Unix socket (the embedded default the SDK starts) would hand out
``http+unix://`` port URLs that no browser, curl or urllib opens; this loopback TCP address
serves the same ports at ``http://127.0.0.1:PORT/sandboxes/ID/ports/N/``.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

#: Used when nothing is configured on a Unix-socket server: loopback, a port the kernel picks
#: (the previous run's when it is still free).
DEFAULT_PORTS_LISTEN = "tcp:127.0.0.1:0"
#: Where the chosen port is remembered between runs (in the state directory).
PORT_MEMO = "ports-listen.port"


def parse_ports_listen(value: str | None, unix_server: bool) -> tuple[str, int] | None:
    """``tcp:HOST:PORT`` (PORT 0: any free one) or ``none``. Default: loopback on a
    Unix-socket server, none on a TCP server (which serves ports on its own listener)."""
    if value is None:
        value = DEFAULT_PORTS_LISTEN if unix_server else "none"
    if value == "none":
        return None
    kind, sep, rest = value.partition(":")
    host, sep2, port = rest.rpartition(":")
    if kind == "tcp" and sep and sep2 and host and port.isdigit() and int(port) < 65536:
        return host.strip("[]"), int(port)
    raise ValueError(f"--ports-listen must be tcp:HOST:PORT or none, not {value!r}")


def bind_ports_listener(address: tuple[str, int], state: Path) -> socket.socket:
    """A listening socket on ``address``; with port 0, the port remembered in ``state`` from
    the last run if it is still free (an upgrade restarts the embedded server, and exposed
    URLs handed out before should keep working), else one the kernel picks."""
    host, port = address
    memo = state / PORT_MEMO
    candidates = [port]
    if not port:
        with contextlib.suppress(OSError, ValueError):
            text = memo.read_bytes()[:8].decode("ascii").strip()
            if text.isdigit() and 0 < int(text) < 65536:
                candidates.insert(0, int(text))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for i, candidate in enumerate(candidates):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, candidate))
            sock.listen(512)
        except OSError as exc:
            sock.close()
            if i + 1 < len(candidates):
                continue
            raise RuntimeError(
                f"cannot listen on --ports-listen {host}:{port}: {exc.strerror or exc}"
            ) from None
        with contextlib.suppress(OSError):
            memo.write_text(f"{sock.getsockname()[1]}\n")
        return sock
    raise AssertionError("unreachable")


def ports_url(sock: socket.socket) -> tuple[tuple[str, int], str]:
    """The listener's address as an ASGI scope's ``server`` names it, and its URLs' base."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return (host, port), f"http://{shown}:{port}"
