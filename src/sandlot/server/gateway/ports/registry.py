"""Which ports each sandbox has exposed: the database's record, cached briefly, and kept in step
with the agent's bound ports (the agent is the truth for what it binds, up to the limit; a new
agent gets the stored ports bound again)."""

from __future__ import annotations

import logging
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from sandlot.server.config import PortLimits
from sandlot.server.control import agentcalls
from sandlot.server.control.control import Control
from sandlot.server.control.tables import SandboxRow, utcnow
from sandlot.server.errors import ApiError
from sandlot.server.status import LIVE_STATUSES, SandboxStatus
from sandlot.server.upstream import AgentPool, UpstreamError

log = logging.getLogger("sandlot.ports")

#: How long a replica trusts its cached view of a sandbox's exposed ports (another replica may
#: have changed them); this replica's own changes apply at once.
EXPOSED_CACHE_TTL = 2.0
#: How long a request waits for the agent's view of its ports before using the stored one.
SYNC_TIMEOUT = 2.0


@dataclass
class Exposed:
    ports: dict[int, dict[str, Any]]
    protocol: str
    checked_at: float


def new_port_info(protect: bool) -> dict[str, Any]:
    """A newly exposed port; a protected one's token is derived from the server key, the
    sandbox, the port and ``since`` (so exposing it again gives a new token)."""
    return {"since": utcnow().isoformat(), "protected": protect}


class PortRegistry:
    """The exposed ports of every sandbox. ``on_closed(sandbox_id, port)`` is told when a port
    is no longer exposed, ``on_forget(sandbox_id)`` when a sandbox is gone, so that whoever
    holds connections to them closes them."""

    def __init__(
        self,
        control: Control,
        limits: PortLimits,
        on_closed: Callable[[str, int], None],
        on_forget: Callable[[str], None],
    ) -> None:
        self.control = control
        self.limits = limits
        self._on_closed = on_closed
        self._on_forget = on_forget
        self._exposed: dict[str, Exposed] = {}
        #: The agent (pool) each sandbox's ports were last pushed to (see :meth:`_sync`).
        self._synced: dict[str, AgentPool] = {}

    async def exposed(self, sandbox_id: str) -> Exposed | None:
        """The sandbox's exposed ports (cached briefly); None if there is no such sandbox."""
        entry = self._exposed.get(sandbox_id)
        now = time.monotonic()
        if (
            entry is not None
            and now - entry.checked_at < EXPOSED_CACHE_TTL
            and not self._agent_changed(sandbox_id)
        ):
            return entry
        row = await self.control.db(self.control.store.get_sandbox, sandbox_id)
        if row is None or row.status not in LIVE_STATUSES:
            self.forget(sandbox_id)
            return None
        ports = dict(row.exposed_ports or {})
        if row.status == SandboxStatus.RUNNING:  # never ask a sleeping (perhaps frozen) agent
            ports = await self._sync(row, ports)
        token = self.control.store.port_token
        entry = Exposed(
            # the tokens are derived (or opened) here, once per cache refresh
            {int(p): {**v, "token": token(row.id, int(p), v)} for p, v in ports.items()},
            row.exposed_port_protocol or "http",
            now,
        )
        self._exposed[sandbox_id] = entry
        return entry

    async def agent(self, sandbox_id: str) -> AgentPool | None:
        """The sandbox's agent pool, with its secret (the tunnel needs it)."""
        return await self.control.agents.get(sandbox_id)

    def _agent_changed(self, sandbox_id: str) -> bool:
        current = self.control.agents.cached(sandbox_id)
        return current is not None and current is not self._synced.get(sandbox_id)

    async def _sync(self, row: SandboxRow, ports: dict[str, Any]) -> dict[str, Any]:
        """Keep the agent's bound ports and the database in step. A new agent (the sandbox woke
        from deep sleep, or this server restarted) gets the stored ports bound again; otherwise
        the agent is the truth: a port bound or unbound there directly (Koyeb's SDK calls
        ``/bind_port`` through the agent gateway) is exposed or unexposed here too."""
        agent = await self.agent(row.id)
        if agent is None:
            return ports
        try:
            with anyio.fail_after(SYNC_TIMEOUT):  # all of it: one call per stored port
                if self._synced.get(row.id) is not agent:
                    ok = True
                    for port in sorted(ports, key=lambda p: str(ports[p].get("since", ""))):
                        body = {"port": port, "multi": True}
                        status, _ = await agentcalls.call(agent, "POST", "/bind_port", body)
                        ok = ok and status == 200
                    if ok:
                        self._synced[row.id] = agent
                    return ports
                status, answer = await agentcalls.call(agent, "GET", "/bound_ports")
            if status != 200:
                return ports
            listed = agentcalls.validate(agentcalls.BoundPorts, answer, "/bound_ports")
        except (UpstreamError, TimeoutError) as exc:
            log.info("ports of %s: no usable answer from the agent (%s)", row.id, exc)
            return ports
        bound = [str(p) for p in dict.fromkeys(listed.ports)]
        # The agent's word counts only up to the limit (it runs inside the sandbox).
        room = max(0, self.limits.max_exposed - len([p for p in ports if p in bound]))
        added = [p for p in bound if p not in ports][:room]
        removed = [p for p in ports if p not in bound]
        if not added and not removed:
            return ports
        protect = bool(row.protect_ports)

        def change(current: dict[str, Any]) -> None:
            for p in removed:
                current.pop(p, None)
            for p in added:
                current.setdefault(p, new_port_info(protect))

        result = await self.change(row.id, change)
        for p in removed:
            self._on_closed(row.id, int(p))
        return result

    async def change(
        self, sandbox_id: str, change: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """Change the stored ports (under the row's lock); the cache is read afresh next time."""
        ports: dict[str, Any] = await self.control.db(
            self.control.store.change_exposed_ports, sandbox_id, change
        )
        self._exposed.pop(sandbox_id, None)
        return ports

    def forget(self, sandbox_id: str) -> None:
        """The sandbox is gone (or no longer live): drop what is known of its ports."""
        self._exposed.pop(sandbox_id, None)
        self._synced.pop(sandbox_id, None)
        self._on_forget(sandbox_id)

    def cached(self) -> list[str]:
        """The sandboxes whose ports are cached here."""
        return list(self._exposed)

    def check_room(self, sandbox_id: str, ports: dict[str, Any], port: int) -> None:
        limit = self.limits.max_exposed
        if str(port) not in ports and len(ports) >= limit:
            raise ApiError(
                409,
                "too_many_ports",
                f"sandbox {sandbox_id} already has {len(ports)} exposed ports, the limit "
                f"(sandlot server --max-exposed-ports {limit}); unexpose one first",
            )

    @typing.overload
    async def agent_call(
        self, sandbox_id: str, route: Literal["/bound_ports"], body: None
    ) -> tuple[int, agentcalls.BoundPorts]: ...

    @typing.overload
    async def agent_call(
        self, sandbox_id: str, route: str, body: dict[str, Any]
    ) -> tuple[int, agentcalls.AgentReply]: ...

    async def agent_call(
        self, sandbox_id: str, route: str, body: dict[str, Any] | None
    ) -> tuple[int, agentcalls.BoundPorts | agentcalls.AgentReply]:
        """A JSON call to the sandbox's agent (waking it if needed): (status, answer), the
        answer validated (``/bound_ports`` when it is a 200: its ports; else its message)."""
        async with self.control.lifecycle.activity(sandbox_id):
            agent = await self.agent(sandbox_id)
            if agent is None:
                raise ApiError(404, "not_found", f"sandbox {sandbox_id} not found")
            method = "GET" if route == "/bound_ports" else "POST"
            try:
                status, answer = await agentcalls.call(agent, method, route, body)
                if route == "/bound_ports" and status == 200:
                    return status, agentcalls.validate(agentcalls.BoundPorts, answer, route)
                return status, agentcalls.validate(agentcalls.AgentReply, answer, route)
            except UpstreamError as exc:
                raise ApiError(
                    502, "agent_unreachable", f"sandbox {sandbox_id}'s agent: {exc}"
                ) from exc
