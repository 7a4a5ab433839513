"""Sandbox lifecycle: sleep when idle, wake on traffic, delete after the chosen delays.

The rules are the seed's (Koyeb's):

- ``idle_timeout`` seconds without activity put a sandbox to sleep (0 disables sleep). Sleep is
  *deep* -- processes end, memory is released, the filesystem stays -- unless light sleep is
  enabled, in which case it is *light* (processes frozen, memory kept, no CPU) and turns deep
  after :data:`DEEP_SLEEP_AFTER_LIGHT` seconds.
- ``delete_after_delay``: delete that many seconds after creation.
- ``delete_after_inactivity_delay``: delete that many seconds after the sandbox fell asleep.

Activity is what passes through the gateway *authenticated*: every request to the agent API
that carries the sandbox's secret, and every request to an exposed port (public, or with its
token), counts from its start to its end, so an open stream (``exec_stream``, process logs)
keeps a sandbox awake, while a background process started with ``launch_process`` alone does
not (use ``idle_timeout=0`` for that). A request to a sleeping sandbox wakes it first,
transparently. Anything else -- an unauthenticated ``/health``, a wrong secret or port token --
neither wakes a sandbox nor keeps it awake (anyone who knows a sandbox's id could otherwise keep
it running forever).

Deadlines are computed from timestamps stored in the database (created, last activity, slept),
so they survive a server restart; the last-activity time is written at most every
:data:`ACTIVITY_FLUSH_SECONDS` (and at every sleep) to keep the gateway's hot path free of writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.abc

from sandlot.engines.base import EngineError
from sandlot.server.control.core import Core
from sandlot.server.control.tables import SandboxRow, utcnow
from sandlot.server.errors import ApiError, WakeError
from sandlot.server.status import SandboxStatus

log = logging.getLogger("sandlot.lifecycle")

#: With light sleep, a sandbox asleep this long goes into deep sleep (Koyeb: 3900 s).
DEEP_SLEEP_AFTER_LIGHT = 3900
ACTIVITY_FLUSH_SECONDS = 5.0
TICK_SECONDS = 0.5


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


class Lifecycle:
    """Sleep, wake and delete-after timers of every sandbox. ``delete(project, id, reason)``
    is the control plane's delete, called when a deadline passes."""

    def __init__(
        self,
        control: Core,
        delete: Callable[[str, str, str], Awaitable[None]],
        tick: float = TICK_SECONDS,
    ) -> None:
        self.control = control
        self._delete = delete
        self.tick = tick
        self._inflight: dict[str, int] = defaultdict(int)
        #: Monotonic-free wall times (UTC) of the last activity seen by this server.
        self._last_activity: dict[str, dt.datetime] = {}
        self._flushed: dict[str, float] = {}
        self._locks: dict[str, anyio.Lock] = {}
        #: Which sandboxes sleep, for the gateway's fast path; ``_transitions`` counts the
        #: changes this server made, so a refresh read before one of them is not applied.
        self._sleeping: dict[str, tuple[str, str]] = {}  # id -> (sleep kind, region)
        self._transitions = 0
        #: Set by :meth:`follow`: another replica's transitions are possible.
        self.following = False

    def _lock(self, sandbox_id: str) -> anyio.Lock:
        return self._locks.setdefault(sandbox_id, anyio.Lock())

    def transition_lock(self, sandbox_id: str) -> anyio.Lock:
        """Held while a sandbox sleeps, wakes or is restarted (agentwatch.py): one at a time."""
        return self._lock(sandbox_id)

    # -- activity (the gateway) ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def activity(self, sandbox_id: str) -> AsyncIterator[None]:
        """Wrap one request to a sandbox: it is awake for the request's whole duration."""
        self._inflight[sandbox_id] += 1
        try:
            await self.ensure_awake(sandbox_id)
            yield
        finally:
            self._inflight[sandbox_id] -= 1
            if self._inflight[sandbox_id] <= 0:
                del self._inflight[sandbox_id]
            await self._touch(sandbox_id)

    async def _touch(self, sandbox_id: str) -> None:
        now = utcnow()
        self._last_activity[sandbox_id] = now
        if time.monotonic() - self._flushed.get(sandbox_id, 0.0) >= ACTIVITY_FLUSH_SECONDS:
            self._flushed[sandbox_id] = time.monotonic()
            with anyio.CancelScope(shield=True):
                await self.control.db(
                    self.control.store.update_sandbox,
                    sandbox_id,
                    last_activity_at=now,
                )

    def is_awake(self, sandbox_id: str) -> bool:
        """Neither asleep nor going to sleep or waking: what the gateway checks before passing
        on a request that must not wake the sandbox (an unauthenticated ``/health``)."""
        transition = self._locks.get(sandbox_id)
        return sandbox_id not in self._sleeping and (transition is None or not transition.locked())

    async def ensure_awake(self, sandbox_id: str) -> None:
        """Wake a sleeping sandbox (no-op for any other status, including unknown ids).

        The common case -- an awake sandbox -- costs a set lookup: which sandboxes sleep is kept
        in memory (filled from the database at every check, so a restart or another replica's
        transition is seen within a tick)."""
        if self.is_awake(sandbox_id):
            if not self.following:
                return
            # One replica of several: another may have put it to sleep since this one's last
            # read (follow()), so the store says (one indexed read per request).
            row = await self.control.db(self.control.store.get_sandbox, sandbox_id)
            if row is None or row.status != SandboxStatus.SLEEPING:
                return
        # Asleep, or a transition is under way (a request that slipped in as the sandbox was
        # being put to sleep must not reach a frozen agent): wait for it, then look again.
        async with self._lock(sandbox_id):
            known = self._sleeping.get(sandbox_id)
            if known is not None and known[0] == "light":
                # The hot case of light sleep: thaw without a database round trip first.
                await self._thaw(sandbox_id, known[1], time.perf_counter())
                return
            row = await self.control.db(self.control.store.get_sandbox, sandbox_id)
            if row is None or row.status != SandboxStatus.SLEEPING:
                self._mark(sandbox_id, sleeping=None)
                return
            await self._wake(row)

    async def _thaw(self, sandbox_id: str, region: str, started: float) -> None:
        await self.control.engines[region].resume(sandbox_id)
        # Thawed: let the request through now; the bookkeeping follows in the background,
        # under the sandbox's lock so no later transition overtakes it.
        self._mark(sandbox_id, sleeping=None)
        background = self.control.background
        if background is not None:
            background.start_soon(self._record_wake, sandbox_id, "light", started)
        else:  # the timer loop is not running (embedded use): record it now
            await self._write_wake(sandbox_id, "light", started)

    async def _wake(self, row: SandboxRow) -> None:
        engine = self.control.engines[row.region]
        started = time.perf_counter()
        kind = row.sleep_kind or "deep"
        try:
            if kind == "light":
                await self._thaw(row.id, row.region, started)
                return
            info = await engine.start(row.id)
            await self.control.db(
                self.control.store.update_sandbox,
                row.id,
                agent_unix_path=info.agent_address.unix_path,
                agent_host=info.agent_address.host,
                agent_port=info.agent_address.port,
            )
            self.control.agents.evict(row.id)  # connections to the old agent are gone
            await self.control.agents.wait_healthy(engine, row.id, info.agent_address, 60.0)
        except (EngineError, OSError, ApiError) as exc:
            await self.control.db(
                self.control.store.update_sandbox,
                row.id,
                status=SandboxStatus.ERROR,
                error=f"waking from {kind} sleep failed: {exc}",
            )
            await self.control.event(row.id, "error", f"waking from {kind} sleep failed: {exc}")
            raise WakeError(f"sandbox {row.id} could not wake from {kind} sleep: {exc}") from exc
        self._mark(row.id, sleeping=None)
        await self._write_wake(row.id, kind, started)

    async def _record_wake(self, sandbox_id: str, kind: str, started: float) -> None:
        async with self._lock(sandbox_id):
            await self._write_wake(sandbox_id, kind, started)

    async def _write_wake(self, sandbox_id: str, kind: str, started: float) -> None:
        ms = (time.perf_counter() - started) * 1000
        await self.control.db(
            self.control.store.update_sandbox,
            sandbox_id,
            status=SandboxStatus.RUNNING,
            sleep_kind=None,
            slept_at=None,
            last_activity_at=utcnow(),
        )
        await self.control.event(sandbox_id, "woke", f"from {kind} sleep in {ms:.1f} ms")

    # -- transitions --------------------------------------------------------------------------

    async def sleep(self, sandbox_id: str, kind: str) -> bool:
        """Put a sandbox to sleep unless a request is in flight; True if it slept."""
        async with self._lock(sandbox_id):
            if self._inflight.get(sandbox_id):
                return False
            row = await self.control.db(self.control.store.get_sandbox, sandbox_id)
            if row is None or row.status not in (SandboxStatus.RUNNING, SandboxStatus.SLEEPING):
                return False
            engine = self.control.engines[row.region]
            if kind == "light" and not getattr(engine, "can_freeze", True):
                kind = "deep"  # e.g. Kubernetes: a Pod cannot be frozen, only scaled to zero
            if row.status == SandboxStatus.SLEEPING and (row.sleep_kind == kind or kind == "light"):
                return False
            if kind == "light":
                await engine.pause(sandbox_id)
            else:
                if row.status == SandboxStatus.SLEEPING:  # light -> deep: thaw so the kill can land
                    with contextlib.suppress(EngineError):
                        await engine.resume(sandbox_id)
                kept = await engine.stop(sandbox_id)
                self.control.agents.evict(sandbox_id)
            slept_at = row.slept_at if row.status == SandboxStatus.SLEEPING else utcnow()
            await self.control.db(
                self.control.store.update_sandbox,
                sandbox_id,
                status=SandboxStatus.SLEEPING,
                sleep_kind=kind,
                slept_at=slept_at,
                last_activity_at=self._last_activity.get(sandbox_id, row.last_activity_at),
            )
            if kind == "light":
                detail = "processes frozen, memory kept"
            else:
                detail = kept or "processes stopped, memory released, filesystem kept"
            self._mark(sandbox_id, sleeping=(kind, row.region))
            await self.control.event(sandbox_id, f"slept ({kind})", detail)
            return True

    async def expire(self, row: SandboxRow, reason: str) -> None:
        async with self._lock(row.id):
            with contextlib.suppress(ApiError):  # already gone: nothing to do
                await self._delete(row.project, row.id, reason)

    def _mark(self, sandbox_id: str, *, sleeping: tuple[str, str] | None) -> None:
        """Record a transition: ``sleeping`` is (kind, region), or None once awake."""
        self._transitions += 1
        if sleeping is not None:
            self._sleeping[sandbox_id] = sleeping
        else:
            self._sleeping.pop(sandbox_id, None)

    def forget(self, sandbox_id: str) -> None:
        for d in (self._last_activity, self._flushed, self._locks):
            d.pop(sandbox_id, None)
        self._mark(sandbox_id, sleeping=None)

    # -- the timer loop -----------------------------------------------------------------------

    async def load(self) -> None:
        """Learn which sandboxes sleep before the first request is served: otherwise a request
        arriving right after a restart, before the first :meth:`check`, would be forwarded to
        the agent of a deeply sleeping sandbox (connection refused) instead of waking it."""
        rows = await self.control.db(
            self.control.store.sandboxes_with_status, [SandboxStatus.SLEEPING]
        )
        self._sleeping = _sleeping_of(rows)

    async def follow(self) -> None:
        """For a replica of several (``ServerConfig.leadership``): which sandboxes sleep is
        read every tick whether or not this replica leads, since the leader's timers put them
        to sleep, so that a request here wakes them; and since that read may be a tick old,
        :meth:`ensure_awake` then asks the store for each request (one indexed read). Left: a
        request in the moment between the leader stopping a sandbox and recording it asleep
        reaches the stopped agent and fails once."""
        self.following = True
        while True:
            generation = self._transitions
            rows = await self.control.db(
                self.control.store.sandboxes_with_status, [SandboxStatus.SLEEPING]
            )
            if generation == self._transitions:  # no transition here since the read
                self._sleeping = _sleeping_of(rows)
            await anyio.sleep(self.tick)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self.control.background = tg
            while True:
                try:
                    await self.check(utcnow())
                except Exception:  # pragma: no cover - logged; the loop must go on
                    log.exception("lifecycle check failed")
                await anyio.sleep(self.tick)

    async def check(self, now: dt.datetime) -> None:
        generation = self._transitions
        rows = await self.control.db(
            self.control.store.sandboxes_with_status,
            [SandboxStatus.RUNNING, SandboxStatus.SLEEPING],
        )
        if generation == self._transitions:  # no transition since the read: it is current
            self._sleeping = _sleeping_of(rows)
        for row in rows:
            await self._check_one(row, now)

    async def _check_one(self, row: SandboxRow, now: dt.datetime) -> None:
        created = _aware(row.created_at) or now
        slept = _aware(row.slept_at)
        if row.delete_after_delay is not None and (now - created).total_seconds() >= (
            row.delete_after_delay
        ):
            await self.expire(row, f"delete_after_delay ({row.delete_after_delay}s) passed")
            return
        if row.status == SandboxStatus.SLEEPING:
            asleep_for = (now - slept).total_seconds() if slept else 0.0
            if row.delete_after_inactivity_delay is not None and asleep_for >= (
                row.delete_after_inactivity_delay
            ):
                await self.expire(
                    row,
                    f"delete_after_inactivity_delay ({row.delete_after_inactivity_delay}s) passed",
                )
            elif row.sleep_kind == "light" and asleep_for >= (
                DEEP_SLEEP_AFTER_LIGHT if row.deep_sleep_after is None else row.deep_sleep_after
            ):
                await self.sleep(row.id, "deep")
            return
        if row.idle_timeout <= 0 or self._inflight.get(row.id):
            return
        last = self._last_activity.get(row.id) or _aware(row.last_activity_at) or created
        if (now - last).total_seconds() >= row.idle_timeout:
            await self.sleep(row.id, "light" if row.light_sleep else "deep")


def _sleeping_of(rows: list[SandboxRow]) -> dict[str, tuple[str, str]]:
    """Which of ``rows`` sleep: id → (sleep kind, region)."""
    return {
        r.id: (r.sleep_kind or "deep", r.region) for r in rows if r.status == SandboxStatus.SLEEPING
    }
