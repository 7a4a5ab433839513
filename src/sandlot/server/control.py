"""The control plane's logic: sandboxes' life from create to delete, kept consistent between the
database and the engines. HTTP concerns (parsing, status codes) live in :mod:`.app`."""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from sandlot.engines.base import (
    AgentAddress,
    Engine,
    EngineError,
    EngineUnavailableError,
    ImageError,
    InsufficientResources,
    NetworkMode,
    RegistryAuth,
    SandboxSpec,
    SandboxState,
)
from sandlot.instance_types import get_instance_type
from sandlot.netpolicy import resolve_policy
from sandlot.server import agentcalls
from sandlot.server.db import DatabaseFull, QuotaExceeded, SandboxRow, Store, utcnow
from sandlot.server.lifecycle import Lifecycle
from sandlot.server.pool import PoolKey, WarmPools
from sandlot.server.schemas import CreateSandbox
from sandlot.server.upstream import AgentPool, UpstreamError

log = logging.getLogger("sandlot.server")

T = TypeVar("T")

DEFAULT_IMAGE = "default"
#: Koyeb's image names that mean "the default sandbox image" here.
IMAGE_ALIASES = {"koyeb/sandbox": DEFAULT_IMAGE, "koyeb/sandbox:latest": DEFAULT_IMAGE}
#: How long the gateway trusts its cached sandbox → agent mapping before re-reading the database
#: (another replica may have deleted the sandbox).
AGENT_CACHE_TTL = 5.0
LIVE_STATUSES = ("creating", "running", "paused", "sleeping")


class ApiError(Exception):
    """An error for the API's client: HTTP status, a stable code and a readable message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class _AgentEntry:
    pool: AgentPool
    checked_at: float


def address_of(row: SandboxRow) -> AgentAddress | None:
    if row.agent_unix_path:
        return AgentAddress(unix_path=row.agent_unix_path)
    if row.agent_host and row.agent_port:
        return AgentAddress(host=row.agent_host, port=row.agent_port)
    return None


@dataclass
class Control:
    store: Store
    engines: dict[str, Engine]
    default_region: str
    _agents: dict[str, _AgentEntry] = field(default_factory=dict)
    pool_sizes: dict[PoolKey, int] = field(default_factory=dict)
    lifecycle: Lifecycle = field(init=False)
    pools: WarmPools | None = field(init=False)

    def __post_init__(self) -> None:
        self.lifecycle = Lifecycle(self)
        self.pools = (
            WarmPools(self, self.pool_sizes, self.default_region) if self.pool_sizes else None
        )

    async def db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a store call in a worker thread. A call that found the disk full is tried once
        more: the failure released the database's reserve (see db.DiskReserve)."""
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        except DatabaseFull:
            try:
                return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
            except DatabaseFull as exc:
                raise ApiError(507, "insufficient_storage", str(exc)) from exc

    # -- create -------------------------------------------------------------------------------

    async def create(
        self, project: str, req: CreateSandbox, may_be_privileged: bool = False
    ) -> SandboxRow:
        """``may_be_privileged``: the caller's scope allows ``privileged=True`` (the local
        socket's owner, or a token with the privileged or admin scope)."""
        if req.privileged and not may_be_privileged:
            raise ApiError(
                403,
                "forbidden",
                "privileged sandboxes need a token with the 'privileged' scope "
                "(sandlot token create --scope privileged)",
            )
        auth: RegistryAuth | None = None
        if req.registry_secret is not None:
            found = await self.db(self.store.get_registry_secret, project, req.registry_secret)
            if found is None:
                raise ApiError(
                    400,
                    "invalid_registry_secret",
                    f"no registry secret named {req.registry_secret!r} in this project "
                    "(POST /v1/secrets, or `sandlot secret create`)",
                )
            password = self.store.registry_password(found)
            auth = RegistryAuth(found.host, found.username, password)
        region = req.region or self.default_region
        engine = self.engines.get(region)
        if engine is None:
            known = ", ".join(sorted(self.engines))
            raise ApiError(
                400, "invalid_region", f"unknown region {region!r}; this server has: {known}"
            )
        image = req.image or DEFAULT_IMAGE
        image = IMAGE_ALIASES.get(image, image)
        mode, allow = resolve_policy(req.block_network, req.outbound_allowlist)
        if self.pools is not None and mode is NetworkMode.NONE and auth is None:
            try:
                claimed = await self.pools.claim(project, req, image)
            except QuotaExceeded as exc:
                raise ApiError(429, "quota_exceeded", str(exc)) from None
            if claimed is not None:
                return claimed
        sandbox_id = secrets.token_hex(12)
        now = utcnow()
        row = SandboxRow(
            id=sandbox_id,
            project=project,
            name=req.name or f"sandbox-{sandbox_id[:8]}",
            status="creating",
            image=image,
            instance_type=req.instance_type,
            region=region,
            labels=dict(req.labels or {}),
            env=self.store.seal_env(req.env or {}),
            privileged=req.privileged,
            exposed_port_protocol=req.exposed_port_protocol,
            enable_tcp_proxy=req.enable_tcp_proxy,
            protect_ports=req.protect_ports,
            registry_secret=req.registry_secret,
            idle_timeout=req.idle_timeout,
            delete_after_delay=req.delete_after_delay,
            delete_after_inactivity_delay=req.delete_after_inactivity_delay,
            light_sleep=req.enable_light_sleep,
            network=mode.value,
            outbound_allowlist=list(allow) if allow is not None else None,
            error="",
            created_at=now,
            updated_at=now,
        )
        try:
            await self.db(self.store.add_sandbox, row, True)
        except QuotaExceeded as exc:
            raise ApiError(429, "quota_exceeded", str(exc)) from None
        secret = self.store.sandbox_secret(row)
        spec = SandboxSpec(
            id=sandbox_id,
            image=image,
            instance_type=get_instance_type(req.instance_type),
            secret=secret,
            env=dict(req.env or {}),
            name=row.name,
            privileged=req.privileged,
            labels=dict(req.labels or {}),
            network=mode,
            outbound_allowlist=allow,
            registry_auth=auth,
        )
        try:
            info = await engine.create(spec)
            address = info.agent_address
            await self.db(
                self.store.update_sandbox,
                sandbox_id,
                agent_unix_path=address.unix_path,
                agent_host=address.host,
                agent_port=address.port,
            )
            if req.wait_ready:
                await self._wait_healthy(engine, sandbox_id, address, req.timeout, secret)
            final = await self.db(
                self.store.update_sandbox, sandbox_id, only_if_status="creating", status="running"
            )
            if final is None:  # pragma: no cover - row vanished under us
                raise ApiError(500, "internal", "sandbox row disappeared during create")
            if final.status != "running":
                raise ApiError(
                    409, "deleted", f"sandbox {sandbox_id} was deleted while being created"
                )
            await self.event(sandbox_id, "created", f"{image} ({req.instance_type})")
            return final  # type: ignore[no-any-return]
        except BaseException as exc:
            # No half-created sandboxes, whatever went wrong (including the client going away,
            # which arrives here as cancellation): remove it from the engine and mark the row.
            with anyio.CancelScope(shield=True):
                await self._discard(engine, sandbox_id, _describe(exc))
            if isinstance(exc, ImageError):
                raise ApiError(400, "invalid_image", str(exc)) from exc
            if isinstance(exc, EngineUnavailableError):
                raise ApiError(503, "engine_unavailable", str(exc)) from exc
            if isinstance(exc, InsufficientResources):
                raise insufficient(exc) from exc
            if isinstance(exc, EngineError):
                raise ApiError(500, "engine_error", f"creating the sandbox failed: {exc}") from exc
            raise

    async def _discard(self, engine: Engine, sandbox_id: str, reason: str) -> None:
        try:
            await engine.delete(sandbox_id)
        except Exception:  # pragma: no cover - logged; the row still says what happened
            log.exception("cleaning up sandbox %s failed", sandbox_id)
        await self._evict(sandbox_id)
        await self.db(
            self.store.update_sandbox,
            sandbox_id,
            status="deleted",
            deleted_at=utcnow(),
            error=reason,
        )

    async def _wait_healthy(
        self,
        engine: Engine,
        sandbox_id: str,
        address: AgentAddress,
        timeout: float,
        secret: str | None = None,
    ) -> None:
        if address.unix_path is not None and len(address.unix_path.encode()) > 107:
            # The path goes to the log, not to the client: host paths are not a tenant's business.
            log.error("agent socket path too long (108 bytes at most): %s", address.unix_path)
            raise ApiError(
                500,
                "engine_error",
                f"the agent socket path of sandbox {sandbox_id} is longer than a Unix socket "
                "allows (108 bytes); the server's log names it: use a shorter state directory",
            )
        pool = self._pool_for(sandbox_id, address, secret)
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
                last = await self._probe(pool)
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

    @staticmethod
    async def _probe(pool: AgentPool) -> str:
        """ "" if the agent answers /health with 200, else why not (bounded: hostile input)."""
        try:
            status, _ = await agentcalls.call(pool, "GET", "/health", timeout=2.0)
        except UpstreamError as exc:
            return str(exc)
        return "" if status == 200 else f"HTTP {status}"

    # -- read / update / delete -----------------------------------------------------------------

    async def get(self, project: str, sandbox_id: str) -> SandboxRow:
        row = await self.db(self.store.get_sandbox, sandbox_id, project)
        if row is None:
            raise ApiError(404, "not_found", f"sandbox {sandbox_id} not found")
        return row  # type: ignore[no-any-return]

    async def update(self, project: str, sandbox_id: str, fields: dict[str, Any]) -> SandboxRow:
        row = await self.get(project, sandbox_id)
        if "block_network" in fields or "outbound_allowlist" in fields:
            mode, allow = resolve_policy(
                fields.pop("block_network", None), fields.pop("outbound_allowlist", None)
            )
            engine = self.engines.get(row.region)
            if engine is not None:
                try:
                    await engine.set_network(sandbox_id, mode, allow)
                except EngineError as exc:
                    raise ApiError(
                        500, "engine_error", f"changing the network failed: {exc}"
                    ) from exc
            fields["network"] = mode.value
            fields["outbound_allowlist"] = list(allow) if allow is not None else None
        row = await self.db(self.store.update_sandbox, sandbox_id, **fields)
        return row  # type: ignore[no-any-return]

    async def delete(
        self, project: str, sandbox_id: str, reason: str = "deleted on request"
    ) -> None:
        row = await self.get(project, sandbox_id)
        engine = self.engines.get(row.region)
        if engine is not None:
            await engine.delete(sandbox_id)
        await self._evict(sandbox_id)
        await self.db(self.store.update_sandbox, sandbox_id, status="deleted", deleted_at=utcnow())
        await self.event(sandbox_id, "deleted", reason)
        self.lifecycle.forget(sandbox_id)

    async def event(self, sandbox_id: str, kind: str, detail: str = "") -> None:
        """Record a step of a sandbox's history (``GET /v1/sandboxes/{id}/events``)."""
        with anyio.CancelScope(shield=True):
            await self.db(self.store.add_event, sandbox_id, kind, detail)

    async def events(self, project: str, sandbox_id: str) -> list[Any]:
        row = await self.db(self.store.get_any_sandbox, sandbox_id)
        if row is None or row.project != project:
            raise ApiError(404, "not_found", f"sandbox {sandbox_id} not found")
        return await self.db(self.store.list_events, sandbox_id)  # type: ignore[no-any-return]

    # -- gateway support ----------------------------------------------------------------------

    def _pool_for(
        self, sandbox_id: str, address: AgentAddress, secret: str | None = None
    ) -> AgentPool:
        entry = self._agents.get(sandbox_id)
        if entry is None or entry.pool.address != address:
            if entry is not None:
                entry.pool.close()
            entry = _AgentEntry(AgentPool(address), time.monotonic())
            self._agents[sandbox_id] = entry
        if secret is not None:
            entry.pool.secret = secret.encode()
        return entry.pool

    async def agent_for(self, sandbox_id: str, fresh: bool = False) -> AgentPool | None:
        """The connection pool of a live sandbox's agent, or None if there is no such sandbox.
        ``fresh``: re-read the database rather than trust the cache. The pool carries the
        sandbox's secret, which the gateway checks before anything counts as activity."""
        entry = self._agents.get(sandbox_id)
        now = time.monotonic()
        if (
            not fresh
            and entry is not None
            and entry.pool.secret is not None  # a pool made at a wake has none: read it
            and now - entry.checked_at < AGENT_CACHE_TTL
        ):
            return entry.pool
        row = await self.db(self.store.get_sandbox, sandbox_id)
        address = address_of(row) if row is not None and row.status in LIVE_STATUSES else None
        if address is None:
            await self._evict(sandbox_id)
            return None
        pool = self._pool_for(sandbox_id, address, self.store.sandbox_secret(row))
        self._agents[sandbox_id].checked_at = now
        return pool

    async def _evict(self, sandbox_id: str) -> None:
        entry = self._agents.pop(sandbox_id, None)
        if entry is not None:
            entry.pool.close()

    # -- server lifecycle ---------------------------------------------------------------------

    async def reconcile(self, stale_after: float) -> None:
        """After a crash, sandboxes left half-created ("creating", or a warm-pool sandbox being
        made or claimed) are removed."""
        rows = await self.db(self.store.sandboxes_with_status, ["creating", "pooling", "claiming"])
        now = utcnow()
        for row in rows:
            created = (
                row.created_at
                if row.created_at.tzinfo
                else row.created_at.replace(tzinfo=now.tzinfo)
            )
            if (now - created).total_seconds() < stale_after:
                continue
            engine = self.engines.get(row.region)
            if engine is not None:
                await self._discard(engine, row.id, "server stopped while the sandbox was created")
        # Pooled sandboxes of pools this server no longer keeps (or keeps fewer of).
        pooled = await self.db(self.store.sandboxes_with_status, ["pooled"])
        kept: dict[PoolKey, int] = {}
        for row in pooled:
            key = PoolKey(row.image, row.instance_type)
            kept[key] = kept.get(key, 0) + 1
            engine = self.engines.get(row.region)
            if kept[key] > self.pool_sizes.get(key, 0) and engine is not None:
                await self._discard(engine, row.id, "warm pool shrunk")
        await self._reconcile_engines()

    async def _reconcile_engines(self) -> None:
        """Engine-side leftovers of a crash: half-made sandboxes (the engine's own ``recover``)
        and sandboxes this database says were deleted (the server died mid-delete). Sandboxes
        unknown to this database are left alone -- another server may share the engine -- and
        logged."""
        for region, engine in self.engines.items():
            removed = await engine.recover()
            if removed:
                log.warning("engine %s: removed half-created sandboxes %s", region, removed)
            for info in await engine.list():
                row = await self.db(self.store.get_any_sandbox, info.id)
                if row is not None and row.status == "deleted":
                    await engine.delete(info.id)
                elif row is None:
                    log.warning(
                        "engine %s holds sandbox %s unknown to this server", region, info.id
                    )

    async def close(self) -> None:
        for sandbox_id in list(self._agents):
            await self._evict(sandbox_id)
        for engine in self.engines.values():
            await engine.close()
        await self.db(self.store.close)


#: API tokens start with this; sandbox secrets never do (they are hex), so the gateway can refuse
#: to forward a token into a sandbox (see gateway.py).
API_TOKEN_PREFIX = "sl_"


def insufficient(exc: InsufficientResources) -> ApiError:
    """507 Insufficient Storage when the host's disk is short, 503 for its other resources."""
    if exc.resource == "disk":
        return ApiError(507, "insufficient_storage", str(exc))
    return ApiError(503, "insufficient_resources", str(exc))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "create cancelled (the client went away)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
