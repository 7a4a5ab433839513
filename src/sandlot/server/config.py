"""What a server is told at start (``sandlot server`` options, or a test's own): the bottom
layer, read by every other one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol
from urllib.parse import quote

from sandlot.engines.base import RUNTIMES, Engine
from sandlot.images.trust import ImageTrust
from sandlot.instance_types import get_instance_type
from sandlot.server.h2limits import H2Limits

AuthMode = Literal["socket", "token"]
#: The largest JSON request body the control API reads (``--max-json-body``): a create is
#: about 1 KiB. Before the limit, a 1 GiB JSON body took the server to 3.1 GiB.
MAX_JSON_BODY = 1024 * 1024


#: Requests in flight per API token (``sandlot server --max-requests-per-token``).
TOKEN_REQUESTS = 1024


@dataclass(frozen=True)
class PortLimits:
    """Per-sandbox bounds of exposed ports (``sandlot server --max-exposed-ports`` ...)."""

    #: Ports one sandbox may have exposed at once (``expose_port`` beyond: ``409``).
    max_exposed: int = 32
    #: HTTP requests in flight to one port of one sandbox (each holds a connection into it).
    max_requests: int = 256
    #: Requests waiting for one of those slots; beyond, ``503 port_busy`` at once.
    max_queued: int = 512
    #: How long a request may wait for a slot before its ``503``.
    queue_timeout: float = 10.0
    #: How long a TCP proxy connection may take to reach the sandbox's port (waking it included)
    #: before it is closed.
    tcp_connect_timeout: float = 30.0
    #: TCP proxy connections open at once to one sandbox (more are closed as they come): each
    #: holds two descriptors in a relay process, whose capacity all sandboxes share.
    max_tcp_connections: int = 4096


@dataclass(frozen=True)
class PoolKey:
    image: str
    instance_type: str

    @classmethod
    def parse(cls, text: str) -> tuple[PoolKey, int]:
        """``IMAGE:INSTANCE_TYPE=SIZE`` (e.g. ``default:micro=4``)."""
        spec, sep, size = text.rpartition("=")
        image, sep2, instance_type = spec.rpartition(":")
        if not sep or not sep2 or not image or not size.isdigit():
            raise ValueError(f"pool must be IMAGE:INSTANCE_TYPE=SIZE, not {text!r}")
        get_instance_type(instance_type)
        return cls(image, instance_type), int(size)


def unix_public_url(socket_path: str) -> str:
    return "http+unix://" + quote(socket_path, safe="")


@dataclass(frozen=True)
class ProbeSettings:
    #: Seconds between two probes of a sandbox (0 disables the probe).
    interval: float = 10.0
    #: Consecutive failed probes before the sandbox is restarted from outside (its processes
    #: are lost then, so not for a moment of thrashing: a sandbox held at its memory limit by
    #: a hog answered nothing for ~5 s in tests).
    misses_before_restart: int = 3
    #: Consecutive failed restarts before the sandbox is marked ``error``.
    restarts_before_error: int = 3
    #: How long a restarted agent has to answer.
    ready_timeout: float = 30.0


class Leadership(Protocol):
    """Which replica of several on one store runs the owned loops (lifecycle timers, warm
    pools, agent probes) and the start-up reconcile: e.g. a Kubernetes Lease
    (engines/kubernetes/lease.py)."""

    async def lead(self, work: Callable[[], Awaitable[None]]) -> None:
        """Forever: run ``work`` while this replica leads; cancel it when it no longer does."""
        ...

    async def release(self) -> None:
        """Stop leading at once (shutdown), so another replica need not wait for expiry."""
        ...


@dataclass(frozen=True)
class ServerConfig:
    database_url: str
    engines: dict[str, Engine]
    default_region: str
    auth: AuthMode
    #: Base of the sandbox URLs handed to clients, e.g. ``http://127.0.0.1:7000``.
    #: For a Unix socket: ``http+unix://<quoted socket path>``. None: from each request.
    public_url: str | None = None
    #: Rows still "creating" this long after creation are discarded at startup (a crash).
    stale_create_after: float = 0.0
    #: Warm pools: how many ready sandboxes to keep per (image, instance type).
    pools: dict[PoolKey, int] = field(default_factory=dict)
    #: Wildcard domain for exposed ports' host form ``{port}-{id}.{domain}`` (None: path form only).
    domain: str | None = None
    #: Where TCP proxies listen (``enable_tcp_proxy``).
    tcp_proxy_host: str = "127.0.0.1"
    #: Who may use host paths and OCI layouts as images (``--trusted-image-dir``).
    image_trust: ImageTrust = field(default_factory=ImageTrust)
    #: The Unix socket whose clients are the socket's owner (admin, like ``auth="socket"``)
    #: even on a TCP server: the CLI's way in (see :mod:`sandlot.server.runner.serve`).
    admin_socket: str | None = None
    #: The server key's file (None: beside a SQLite database, else in the state directory;
    #: see control/serverkey.py).
    key_file: str | None = None
    #: The largest JSON request body the control API accepts (413 past it).
    max_json_body: int = MAX_JSON_BODY
    #: Per-connection bounds of HTTP/2 clients (runner/h2serve.py).
    h2_limits: H2Limits = field(default_factory=H2Limits)
    #: Per-sandbox bounds of exposed ports (gateway/ports/).
    port_limits: PortLimits = field(default_factory=PortLimits)
    #: Requests in flight per API token (gateway/admission.py).
    token_requests: int = TOKEN_REQUESTS
    #: The agents' health probe (control/agentwatch.py).
    agent_probe: ProbeSettings = field(default_factory=ProbeSettings)
    #: The ports-only TCP listener's address (``--ports-listen``): requests that come in on it
    #: reach exposed ports and nothing else (api/portsonly.py).
    ports_listen: tuple[str, int] | None = None
    #: Base of exposed ports' URLs when they are served apart from the API (the ports-only
    #: listener's ``http://127.0.0.1:PORT``). None: the API's own base.
    ports_url: str | None = None
    #: With several replicas on one store: who runs the owned loops (None: this server alone).
    leadership: Leadership | None = None
    #: The runtime of sandboxes whose create names none (``sandlot server --runtime``).
    default_runtime: str = RUNTIMES[0]
