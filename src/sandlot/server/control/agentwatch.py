"""The agent health probe: notices a sandbox whose agent stays down, restarts it from outside,
and marks the sandbox ``error`` only when that fails again and again.

Inside the sandbox ``sandlot-init`` (pid 1) restarts a dead agent within tens of milliseconds
(see ``sandlot/runtime/sandlot-init``): this probe is the second line, for what that cannot fix
-- pid 1 itself gone (the sandbox's runtime stopped), an agent that cannot start again in there
(the pids limit held by the sandbox's own processes), an agent that hangs or was stopped
(``kill -STOP -1``). Every
:attr:`ProbeSettings.interval` seconds it asks each running sandbox's agent for ``/health``
(directly, not through the gateway: it is not activity, and never wakes a sleeping sandbox):

- one miss is recorded (event ``agent unreachable``) and tolerated: it may be a restart
  under way inside;
- :attr:`ProbeSettings.misses_before_restart` (3) misses in a row: the sandbox is restarted from
  outside (its runtime stopped and started again on its kept filesystem, like a deep sleep
  and wake: its processes are lost, the event says so);
- :attr:`ProbeSettings.restarts_before_error` (3) failed restarts in a row: the sandbox is marked
  ``error`` with the reason, and the gateway answers its requests with that reason
  (:func:`unavailable`), which the SDK raises.

Cost: one ``/health`` round trip per running sandbox per interval (~0.3 ms each over the
agent's Unix socket), 32 at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import anyio

from sandlot.engines.base import EngineError
from sandlot.server.config import ProbeSettings
from sandlot.server.control.agents import probe
from sandlot.server.control.control import Control
from sandlot.server.errors import ApiError
from sandlot.server.status import SandboxStatus

log = logging.getLogger("sandlot.agentwatch")

PROBE_CONCURRENCY = 32


@dataclass
class _Health:
    misses: int = 0
    failed_restarts: int = 0
    last: str = ""


@dataclass
class AgentWatch:
    control: Control
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    _health: dict[str, _Health] = field(default_factory=dict)

    async def run(self) -> None:
        if self.settings.interval <= 0:
            return
        while True:
            try:
                await self.check()
            except Exception:  # pragma: no cover - logged; the loop must go on
                log.exception("agent health check failed")
            await anyio.sleep(self.settings.interval)

    async def check(self) -> None:
        """Probe every running sandbox of this server's engines once."""
        rows = await self.control.db(
            self.control.store.sandboxes_with_status, [SandboxStatus.RUNNING]
        )
        rows = [r for r in rows if r.region in self.control.engines]
        for gone in self._health.keys() - {r.id for r in rows}:
            del self._health[gone]
        limiter = anyio.CapacityLimiter(PROBE_CONCURRENCY)

        async def one(row: Any) -> None:
            async with limiter:
                await self.probe(row.id, row.region)

        async with anyio.create_task_group() as tg:
            for row in rows:
                tg.start_soon(one, row)

    async def probe(self, sandbox_id: str, region: str) -> None:
        if not self.control.lifecycle.is_awake(sandbox_id):
            return  # asleep, or a transition holds it: not ours to judge now
        pool = await self.control.agents.get(sandbox_id)
        if pool is None:
            return
        why = await probe(pool)
        if why and not self.control.lifecycle.is_awake(sandbox_id):
            return  # it went to sleep under the probe: not a failure
        health = self._health.setdefault(sandbox_id, _Health())
        if not why:
            if health.misses:
                await self.control.event(sandbox_id, "agent back", "answering /health again")
            self._health.pop(sandbox_id, None)
            return
        health.misses += 1
        health.last = why
        if health.misses == 1:
            await self.control.event(sandbox_id, "agent unreachable", why)
        if health.misses >= self.settings.misses_before_restart:
            await self._restart(sandbox_id, region, health)

    async def _restart(self, sandbox_id: str, region: str, health: _Health) -> None:
        engine = self.control.engines[region]
        reason = f"the agent did not answer {health.misses} health probes ({health.last})"
        try:
            async with self.control.lifecycle.transition_lock(sandbox_id):
                row = await self.control.db(self.control.store.get_sandbox, sandbox_id)
                if row is None or row.status != SandboxStatus.RUNNING:
                    return  # deleted or put to sleep meanwhile
                await engine.stop(sandbox_id)
                self.control.agents.evict(sandbox_id)
                info = await engine.start(sandbox_id)
                await self.control.db(
                    self.control.store.update_sandbox,
                    sandbox_id,
                    agent_unix_path=info.agent_address.unix_path,
                    agent_host=info.agent_address.host,
                    agent_port=info.agent_address.port,
                )
                await self.control.agents.wait_healthy(
                    engine,
                    sandbox_id,
                    info.agent_address,
                    self.settings.ready_timeout,
                    self.control.store.sandbox_secret(row),
                )
        except (EngineError, OSError, ApiError) as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            health.failed_restarts += 1
            await self.control.event(
                sandbox_id,
                "agent restart failed",
                f"{reason}; restarting the sandbox failed ({health.failed_restarts} of "
                f"{self.settings.restarts_before_error}): {message}",
            )
            if health.failed_restarts >= self.settings.restarts_before_error:
                await self._fail(sandbox_id, f"{reason}, and restarting it failed: {message}")
            return
        self._health.pop(sandbox_id, None)
        await self.control.event(
            sandbox_id,
            "agent restarted",
            f"{reason}: the sandbox was restarted on its filesystem; its processes were lost",
        )

    async def _fail(self, sandbox_id: str, reason: str) -> None:
        await self.control.db(
            self.control.store.update_sandbox,
            sandbox_id,
            only_if_status=SandboxStatus.RUNNING,
            status=SandboxStatus.ERROR,
            error=reason,
        )
        self.control.agents.evict(sandbox_id)
        await self.control.event(sandbox_id, "error", reason)
        self._health.pop(sandbox_id, None)


async def unavailable(control: Control, sandbox_id: str) -> tuple[int, dict[str, str]] | None:
    """Why requests to a sandbox in ``error`` cannot be served (status, JSON body), for the
    gateway: the reason, not a bare "not found"; None for any other sandbox."""
    row = await control.db(control.store.get_sandbox, sandbox_id)
    if row is None or row.status != SandboxStatus.ERROR:
        return None
    return 503, {
        "error": f"sandbox {sandbox_id} is in error: {row.error or 'no reason recorded'}",
        "code": "sandbox_error",
    }
