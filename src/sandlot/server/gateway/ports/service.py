"""Exposed ports: the gateway that serves them and the TCP proxy, put together (the control API
that exposes them is :mod:`sandlot.server.api.ports`).

Every request reaches the sandbox through the agent's ``GET /tunnel`` (see
:mod:`..tunnel`): sandboxes have no network the host can reach. HTTP/1.1 requests and responses
are streamed in both directions with backpressure (keep-alive tunnels are pooled per sandbox and
port, :mod:`.forward`, :mod:`.http`); a sandbox made with ``exposed_port_protocol="http2"`` is
spoken to in h2c instead, one multiplexed connection per port (:mod:`..h2upstream`), its
trailers passed on to clients whose server offers ASGI's trailers extension (HTTP/2 clients
under ``sandlot server``, :mod:`sandlot.server.runner.h2serve`); WebSockets are relayed
(:mod:`.websocket`, or as bytes under sandlot's runner). The whole exchange is lifecycle
*activity*: it wakes a sleeping sandbox and keeps it awake while a response streams or a
WebSocket stays open.

Exposed URLs are public, as on Koyeb, unless the sandbox was created with ``protect_ports``:
then each exposed port has its own token, accepted as ``Authorization: Bearer <token>``, as a
``?sandlot_token=`` query parameter (in the host form, this also sets a cookie for that host, so
a browser can follow links), or as that cookie (:mod:`.tokens`); the token is removed before the
request reaches the sandbox. The path form shares the server's origin among all sandboxes: for
browsers, prefer the host form (each port its own origin). URL forms: :mod:`.router`.

The TCP proxy (:mod:`.tcp`) cannot be combined with ``protect_ports`` (refused at create): raw
TCP has no place for a port token, so the proxy would serve protected ports to anyone who
reaches its address.
"""

from __future__ import annotations

import logging

import anyio

from sandlot.server.config import ServerConfig
from sandlot.server.control.control import Control
from sandlot.server.control.tables import SandboxRow
from sandlot.server.gateway.ports.forward import PortPools
from sandlot.server.gateway.ports.registry import PortRegistry
from sandlot.server.gateway.ports.router import PortRouter
from sandlot.server.gateway.ports.tcp import TcpProxies
from sandlot.server.gateway.relay import Relays
from sandlot.server.status import SandboxStatus

log = logging.getLogger("sandlot.ports")


class Ports:
    """Exposed ports of every sandbox: their registry, connections, router and TCP proxies."""

    def __init__(self, config: ServerConfig, control: Control) -> None:
        self.control = control
        self.limits = config.port_limits
        #: Long-lived byte streams (WebSockets, h2c, TCP proxy) are copied by these processes.
        self.relays = Relays()
        self.pools = PortPools(self.limits)
        self.registry = PortRegistry(control, self.limits, self._closed_port, self.pools.forget)
        self.router = PortRouter(config.domain, self.registry, self.pools, control.lifecycle)
        self.tcp = TcpProxies(
            config.tcp_proxy_host, self.limits, self.registry, control.lifecycle, self.relays
        )

    def _closed_port(self, sandbox_id: str, port: int) -> None:
        """A port is no longer exposed: its pooled connections and its open relayed ones
        (WebSockets, TCP proxy connections) end now, not when their clients leave."""
        self.pools.close_port(sandbox_id, port)
        self.relays.close_tagged((sandbox_id, port))

    def closed(self, sandbox_id: str, ports: list[int]) -> None:
        """``ports`` were unexposed through the API."""
        for port in ports:
            self._closed_port(sandbox_id, port)

    async def after_create(
        self, row: SandboxRow, protect_ports: bool, tcp_proxy: bool
    ) -> SandboxRow:
        """Options a warm-pool claim does not carry, and the TCP proxy's listener."""
        if bool(row.protect_ports) != protect_ports or row.enable_tcp_proxy != tcp_proxy:
            row = await self.control.db(
                self.control.store.update_sandbox,
                row.id,
                protect_ports=protect_ports,
                enable_tcp_proxy=tcp_proxy,
            )
        if tcp_proxy and not protect_ports:
            await self.tcp.ensure(row.id)
        return row

    async def run(self, interval: float = 1.0) -> None:
        """Keep TCP proxies in step with the database: a listener for every live sandbox that
        asked for one (also after a restart or a warm-pool claim), none for the others."""
        await self.relays.warm_up()
        while True:
            try:
                rows = await self.control.db(
                    self.control.store.sandboxes_with_status,
                    [SandboxStatus.RUNNING, SandboxStatus.SLEEPING],
                )
                # Never for protected ports (refused at create; rows from before are skipped).
                await self.tcp.keep(
                    {r.id for r in rows if r.enable_tcp_proxy and not r.protect_ports}
                )
                live = {r.id for r in rows}
                for sandbox_id in self.registry.cached():
                    if sandbox_id not in live:
                        self.registry.forget(sandbox_id)
            except Exception:  # pragma: no cover - logged; the loop must go on
                log.exception("ports check failed")
            await anyio.sleep(interval)

    async def close(self) -> None:
        await self.tcp.close()
        await self.relays.close()
        self.pools.close()
