"""Connections to the sandboxes' agents, one keep-alive pool per sandbox, cached.

The gateway asks for a sandbox's agent on every request: the cache keeps the answer (address
and secret) for :data:`AGENT_CACHE_TTL` seconds before reading the database again (another
replica may have deleted the sandbox). Whoever changes an agent (a wake, a sleep, a delete)
evicts its entry; :meth:`Agents.wait_healthy` is the readiness poll of a new one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from sandlot.engines.base import AgentAddress, Engine, SandboxState
from sandlot.server.control import agentcalls
from sandlot.server.errors import ApiError
from sandlot.server.upstream import AgentPool, UpstreamError

log = logging.getLogger("sandlot.server")

#: How long the gateway trusts its cached sandbox → agent mapping before re-reading the database
#: (another replica may have deleted the sandbox).
AGENT_CACHE_TTL = 5.0

#: Where a live sandbox's agent is and its secret, or None (no such live sandbox).
Lookup = Callable[[str], Awaitable[tuple[AgentAddress, str] | None]]


@dataclass
class _Entry:
    pool: AgentPool
    checked_at: float


class Agents:
    """The agents' connection pools, by sandbox id. ``lookup`` reads the database."""

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self._entries: dict[str, _Entry] = {}

    def connect(
        self, sandbox_id: str, address: AgentAddress, secret: str | None = None
    ) -> AgentPool:
        """The pool for ``address`` (a new one if the sandbox's agent moved); ``secret``, if
        given, is what the pool authenticates with from now on."""
        entry = self._entries.get(sandbox_id)
        if entry is None or entry.pool.address != address:
            if entry is not None:
                entry.pool.close()
            entry = _Entry(AgentPool(address), time.monotonic())
            self._entries[sandbox_id] = entry
        if secret is not None:
            entry.pool.secret = secret.encode()
        return entry.pool

    def cached(self, sandbox_id: str) -> AgentPool | None:
        """The cached pool, without reading the database (None: none cached)."""
        entry = self._entries.get(sandbox_id)
        return entry.pool if entry is not None else None

    async def get(self, sandbox_id: str, fresh: bool = False) -> AgentPool | None:
        """The connection pool of a live sandbox's agent, or None if there is no such sandbox.
        ``fresh``: re-read the database rather than trust the cache. The pool carries the
        sandbox's secret, which the gateway checks before anything counts as activity."""
        entry = self._entries.get(sandbox_id)
        now = time.monotonic()
        if (
            not fresh
            and entry is not None
            and entry.pool.secret is not None  # a pool made at a wake has none: read it
            and now - entry.checked_at < AGENT_CACHE_TTL
        ):
            return entry.pool
        found = await self._lookup(sandbox_id)
        if found is None:
            self.evict(sandbox_id)
            return None
        address, secret = found
        pool = self.connect(sandbox_id, address, secret)
        self._entries[sandbox_id].checked_at = now
        return pool

    def evict(self, sandbox_id: str) -> None:
        """Forget a sandbox's agent and close its connections (it slept, moved or is gone)."""
        entry = self._entries.pop(sandbox_id, None)
        if entry is not None:
            entry.pool.close()

    def close(self) -> None:
        for sandbox_id in list(self._entries):
            self.evict(sandbox_id)

    async def wait_healthy(
        self,
        engine: Engine,
        sandbox_id: str,
        address: AgentAddress,
        timeout: float,
        secret: str | None = None,
    ) -> None:
        """Return once the sandbox's agent answers ``/health``; :class:`ApiError` if it died
        first or ``timeout`` passed."""
        if address.unix_path is not None and len(address.unix_path.encode()) > 107:
            # The path goes to the log, not to the client: host paths are not a tenant's business.
            log.error("agent socket path too long (108 bytes at most): %s", address.unix_path)
            raise ApiError(
                500,
                "engine_error",
                f"the agent socket path of sandbox {sandbox_id} is longer than a Unix socket "
                "allows (108 bytes); the server's log names it: use a shorter state directory",
            )
        pool = self.connect(sandbox_id, address, secret)
        deadline = time.monotonic() + timeout
        delay = 0.001
        last = "no answer yet"
        next_inspect = time.monotonic() + 0.5
        while True:
            if time.monotonic() >= next_inspect:
                # A sandbox whose init died will never answer: fail now, not at the deadline.
                next_inspect = time.monotonic() + 0.5
                info = await engine.inspect(sandbox_id)
                if info.state not in (SandboxState.CREATING, SandboxState.RUNNING):
                    detail = f": {info.detail}" if info.detail else ""
                    raise ApiError(
                        500,
                        "sandbox_died",
                        f"sandbox {sandbox_id} stopped before it became ready "
                        f"({info.state.value}){detail}",
                    )
            if address.unix_path is not None and not os.path.exists(address.unix_path):
                # The agent puts its socket in place only once it listens: until then a stat
                # (microseconds) says "not yet" far more cheaply than a connection attempt,
                # so poll it often -- every millisecond of the poll is added to create().
                last, delay = "the agent is not listening yet", 0.001
            else:
                last = await probe(pool)
                if last == "":
                    return
                delay = min(max(delay, 0.005) * 2, 0.1)
            if time.monotonic() + delay > deadline:
                raise ApiError(
                    504,
                    "timeout",
                    f"sandbox {sandbox_id} did not become ready within {timeout:g}s ({last})",
                )
            await anyio.sleep(delay)


async def probe(pool: AgentPool) -> str:
    """ "" if the agent answers /health with 200, else why not (bounded: hostile input)."""
    try:
        status, _ = await agentcalls.call(pool, "GET", "/health", timeout=2.0)
    except UpstreamError as exc:
        return str(exc)
    return "" if status == 200 else f"HTTP {status}"
