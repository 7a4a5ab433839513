"""The control plane's logic: sandboxes' life from create to delete, kept consistent between the
database and the engines. HTTP concerns (parsing, routes) live in :mod:`sandlot.server.api`."""

from __future__ import annotations

import contextlib
import logging
import secrets
from typing import Any

import anyio

from sandlot.engines.base import (
    RUNTIMES,
    Engine,
    EngineError,
    EngineUnavailableError,
    ImageError,
    InsufficientResources,
    NetworkMode,
    RegistryAuth,
    SandboxSpec,
)
from sandlot.instance_types import get_instance_type
from sandlot.netpolicy import resolve_policy
from sandlot.server.config import PoolKey
from sandlot.server.control.core import Core
from sandlot.server.control.lifecycle import Lifecycle
from sandlot.server.control.pools import WarmPools
from sandlot.server.control.snapshots import Snapshots
from sandlot.server.control.store import QuotaExceeded, Store
from sandlot.server.control.tables import SANDBOX_SECRET_COLUMN, SandboxRow, utcnow
from sandlot.server.errors import ApiError
from sandlot.server.schemas import CreateSandbox
from sandlot.server.status import SandboxStatus, SnapshotStatus

log = logging.getLogger("sandlot.server")


DEFAULT_IMAGE = "default"
#: Koyeb's image names that mean "the default sandbox image" here.
IMAGE_ALIASES = {"koyeb/sandbox": DEFAULT_IMAGE, "koyeb/sandbox:latest": DEFAULT_IMAGE}


class Control(Core):
    """The control plane: sandboxes' create, read, update and delete, with their lifecycle
    timers and warm pools."""

    def __init__(
        self,
        store: Store,
        engines: dict[str, Engine],
        default_region: str,
        pool_sizes: dict[PoolKey, int] | None = None,
        default_runtime: str = RUNTIMES[0],
    ) -> None:
        super().__init__(store, engines, default_region)
        self.pool_sizes = dict(pool_sizes or {})
        #: The runtime of creates that name none (``sandlot server --runtime``).
        self.default_runtime = default_runtime
        self.lifecycle = Lifecycle(self, self.delete)
        self.pools = (
            WarmPools(self, self.pool_sizes, self.default_region) if self.pool_sizes else None
        )
        self.snapshots = Snapshots(self, self.create)

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
        if req.runtime is None:  # the server's default (``sandlot server --runtime``)
            req = req.model_copy(update={"runtime": self.default_runtime})
        runtime = req.runtime or self.default_runtime
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
        image = req.image or DEFAULT_IMAGE
        image = IMAGE_ALIASES.get(image, image)
        if req.snapshot is not None:
            snapshot = await self.snapshots.usable(project, req.snapshot)
            if req.region is not None and req.region != snapshot.region:
                raise ApiError(
                    400,
                    "invalid_region",
                    f"snapshot {snapshot.id} is kept in region {snapshot.region!r}: "
                    "its sandboxes run there",
                )
            if req.image is not None and image != snapshot.image:
                raise ApiError(
                    400,
                    "invalid_image",
                    f"a sandbox spawned from snapshot {snapshot.id} runs its image "
                    f"({snapshot.image!r}): leave image out",
                )
            region, image = snapshot.region, snapshot.image
            req = req.model_copy(update={"snapshot": snapshot.id})  # it may have been a name
        engine = self.engines.get(region)
        if engine is None:
            known = ", ".join(sorted(self.engines))
            raise ApiError(
                400, "invalid_region", f"unknown region {region!r}; this server has: {known}"
            )
        mode, allow = resolve_policy(req.block_network, req.outbound_allowlist)
        if (
            self.pools is not None
            and mode is NetworkMode.NONE
            and auth is None
            and req.snapshot is None
            and req.sandbox_secret is None
            and req.command is None
        ):
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
            status=SandboxStatus.CREATING,
            image=image,
            instance_type=req.instance_type,
            region=region,
            labels=dict(req.labels or {}),
            env=self.store.seal_env(req.env or {}),
            privileged=req.privileged,
            runtime=runtime,
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
            snapshot_id=req.snapshot,
            deep_sleep_after=req.deep_sleep_value,
            command=req.command,
            secret_sealed=""
            if req.sandbox_secret is None
            else self.store.key.seal(req.sandbox_secret, SANDBOX_SECRET_COLUMN),
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
            runtime=runtime,
            snapshot=req.snapshot,
            command=req.command,
            project=project,
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
                await self.agents.wait_healthy(engine, sandbox_id, address, req.timeout, secret)
            final = await self.db(
                self.store.update_sandbox,
                sandbox_id,
                only_if_status=SandboxStatus.CREATING,
                status=SandboxStatus.RUNNING,
            )
            if final is None:  # pragma: no cover - row vanished under us
                raise ApiError(500, "internal", "sandbox row disappeared during create")
            if final.status != SandboxStatus.RUNNING:
                raise ApiError(
                    409, "deleted", f"sandbox {sandbox_id} was deleted while being created"
                )
            await self.event(sandbox_id, "created", f"{image} ({req.instance_type})")
            return final  # type: ignore[no-any-return]
        except BaseException as exc:
            # No half-created sandboxes, whatever went wrong (including the client going away,
            # which arrives here as cancellation): remove it from the engine and mark the row.
            with anyio.CancelScope(shield=True):
                await self.discard(engine, sandbox_id, _describe(exc))
            if isinstance(exc, ImageError):
                raise ApiError(400, "invalid_image", str(exc)) from exc
            if isinstance(exc, EngineUnavailableError):
                raise ApiError(503, "engine_unavailable", str(exc)) from exc
            if isinstance(exc, InsufficientResources):
                raise insufficient(exc) from exc
            if isinstance(exc, EngineError):
                raise ApiError(500, "engine_error", f"creating the sandbox failed: {exc}") from exc
            raise

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
        self.agents.evict(sandbox_id)
        await self.db(
            self.store.update_sandbox, sandbox_id, status=SandboxStatus.DELETED, deleted_at=utcnow()
        )
        await self.event(sandbox_id, "deleted", reason)
        self.lifecycle.forget(sandbox_id)
        await self.snapshots.release(row.snapshot_id)

    async def events(self, project: str, sandbox_id: str) -> list[Any]:
        row = await self.db(self.store.get_any_sandbox, sandbox_id)
        if row is None or row.project != project:
            raise ApiError(404, "not_found", f"sandbox {sandbox_id} not found")
        return await self.db(self.store.list_events, sandbox_id)  # type: ignore[no-any-return]

    # -- server lifecycle ---------------------------------------------------------------------

    async def reconcile(self, stale_after: float) -> None:
        """After a crash, sandboxes left half-created ("creating", or a warm-pool sandbox being
        made or claimed) are removed."""
        rows = await self.db(
            self.store.sandboxes_with_status,
            [SandboxStatus.CREATING, SandboxStatus.POOLING, SandboxStatus.CLAIMING],
        )
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
                await self.discard(engine, row.id, "server stopped while the sandbox was created")
        # Pooled sandboxes of pools this server no longer keeps (or keeps fewer of).
        pooled = await self.db(self.store.sandboxes_with_status, [SandboxStatus.POOLED])
        kept: dict[PoolKey, int] = {}
        for row in pooled:
            key = PoolKey(row.image, row.instance_type)
            kept[key] = kept.get(key, 0) + 1
            engine = self.engines.get(row.region)
            if kept[key] > self.pool_sizes.get(key, 0) and engine is not None:
                await self.discard(engine, row.id, "warm pool shrunk")
        for snap in await self.db(self.store.snapshots_with_status, [SnapshotStatus.CREATING]):
            await self.db(
                self.store.update_snapshot,
                snap.id,
                status=SnapshotStatus.FAILED,
                messages=["the server stopped while the snapshot was being made"],
            )
            # Its sandbox was frozen for the copy: awake again unless it sleeps.
            source = await self.db(self.store.get_sandbox, snap.sandbox_id)
            engine = self.engines.get(snap.region)
            if source is not None and source.status == SandboxStatus.RUNNING and engine:
                with contextlib.suppress(EngineError):
                    await engine.resume(source.id)
        await self._reconcile_engines()

    async def _reconcile_engines(self) -> None:
        """Engine-side leftovers of a crash: half-made sandboxes (the engine's own ``recover``)
        and sandboxes this database says were deleted (the server died mid-delete). Sandboxes
        unknown to this database are left alone -- another server may share the engine -- and
        logged, unless the engine is ``exclusive`` to this database (a Kubernetes namespace of
        one deployment, whose replicas share one store): then they are removed, and rows whose
        sandbox the engine no longer has (a Pod deleted behind sandlot's back) are marked
        ``error`` as lost."""
        for region, engine in self.engines.items():
            exclusive = getattr(engine, "exclusive", False)
            removed = await engine.recover()
            if removed:
                log.warning("engine %s: removed half-created sandboxes %s", region, removed)
            held = await engine.list()
            for info in held:
                row = await self.db(self.store.get_any_sandbox, info.id)
                if row is not None and row.status == SandboxStatus.DELETED:
                    await engine.delete(info.id)
                elif row is None and exclusive:
                    log.warning("engine %s: removing sandbox %s, which has no row", region, info.id)
                    await engine.delete(info.id)
                elif row is None:
                    log.warning(
                        "engine %s holds sandbox %s unknown to this server", region, info.id
                    )
            if exclusive:
                await self._mark_lost(region, {info.id for info in held})

    async def _mark_lost(self, region: str, held: set[str]) -> None:
        rows = await self.db(
            self.store.sandboxes_with_status,
            [SandboxStatus.RUNNING, SandboxStatus.SLEEPING, SandboxStatus.POOLED],
        )
        for row in rows:
            if row.region == region and row.id not in held:
                await self.db(
                    self.store.update_sandbox,
                    row.id,
                    status=SandboxStatus.ERROR,
                    error="lost: the engine no longer has this sandbox",
                )
                await self.event(row.id, "error", "lost: the engine no longer has this sandbox")

    async def close(self) -> None:
        self.agents.close()
        for engine in self.engines.values():
            await engine.close()
        await self.db(self.store.close)


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
