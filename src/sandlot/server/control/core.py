"""What the control plane's parts share: the store (called from worker threads), the engines by
region, the agents' connections, and a sandbox's history. :class:`.control.Control` builds on
it, and so do :mod:`.lifecycle` and :mod:`.pools`, which get a :class:`Core` rather than the
whole control plane (so that nothing here calls back up into it)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from sandlot.engines.base import AgentAddress, Engine
from sandlot.server.control.agents import Agents
from sandlot.server.control.sqlitefiles import DatabaseFull
from sandlot.server.control.store import Store
from sandlot.server.control.tables import SandboxRow, utcnow
from sandlot.server.errors import ApiError
from sandlot.server.status import LIVE_STATUSES, SandboxStatus

log = logging.getLogger("sandlot.server")


def address_of(row: SandboxRow) -> AgentAddress | None:
    """Where a sandbox's agent listens, as its row says (None: not known yet)."""
    if row.agent_unix_path:
        return AgentAddress(unix_path=row.agent_unix_path)
    if row.agent_host and row.agent_port:
        return AgentAddress(host=row.agent_host, port=row.agent_port)
    return None


class Core:
    def __init__(self, store: Store, engines: dict[str, Engine], default_region: str) -> None:
        self.store = store
        self.engines = engines
        self.default_region = default_region
        self.agents = Agents(self._live_agent)
        #: Where work that must not hold up a request runs (set while the lifecycle loop runs;
        #: None: embedded use, such work is awaited at once).
        self.background: anyio.abc.TaskGroup | None = None

    async def db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a store call in a worker thread. A call that found the disk full is tried once
        more: the failure released the database's reserve (see store.DiskReserve)."""
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        except DatabaseFull:
            try:
                return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
            except DatabaseFull as exc:
                raise ApiError(507, "insufficient_storage", str(exc)) from exc

    async def later(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the background if there is one, else now."""
        if self.background is not None:
            self.background.start_soon(fn, *args)
        else:
            await fn(*args)

    async def event(self, sandbox_id: str, kind: str, detail: str = "") -> None:
        """Record a step of a sandbox's history (``GET /v1/sandboxes/{id}/events``)."""
        with anyio.CancelScope(shield=True):
            await self.db(self.store.add_event, sandbox_id, kind, detail)

    async def discard(self, engine: Engine, sandbox_id: str, reason: str) -> None:
        """Remove a sandbox that never became (or stopped being) usable, saying why in its row."""
        try:
            await engine.delete(sandbox_id)
        except Exception:  # pragma: no cover - logged; the row still says what happened
            log.exception("cleaning up sandbox %s failed", sandbox_id)
        self.agents.evict(sandbox_id)
        await self.db(
            self.store.update_sandbox,
            sandbox_id,
            status=SandboxStatus.DELETED,
            deleted_at=utcnow(),
            error=reason,
        )

    async def _live_agent(self, sandbox_id: str) -> tuple[AgentAddress, str] | None:
        row = await self.db(self.store.get_sandbox, sandbox_id)
        address = address_of(row) if row is not None and row.status in LIVE_STATUSES else None
        if address is None:
            return None
        return address, self.store.sandbox_secret(row)
