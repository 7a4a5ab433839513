"""Snapshots in the control plane: records per project, the engine's copy, spawn and fork.

A snapshot row says what the API shows (Koyeb's names and statuses); its files are the engine's
(:mod:`sandlot.images.snapshots`). Project scoping is the row's: another project's snapshot is
"not found", for get, spawn and delete alike. FILESYSTEM snapshots are what engines make today;
FULL ones (memory and processes) need a runtime that can checkpoint, and are refused with
a message that says which (crun cannot; a gVisor checkpoint, which deep sleep uses, restores
only into its own sandbox so far: engines/local/checkpoint.py says what a copy would need).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from sandlot.engines.base import (
    EngineError,
    InsufficientResources,
    SandboxNotFound,
    Snapshotter,
)
from sandlot.images.snapshots import SnapshotInUse, SnapshotNotFound
from sandlot.server.control.core import Core
from sandlot.server.control.tables import SandboxRow, SnapshotRow, utcnow
from sandlot.server.errors import ApiError
from sandlot.server.schemas import CreateSandbox, CreateSnapshot
from sandlot.server.status import LIVE_STATUSES, SandboxStatus, SnapshotStatus

log = logging.getLogger("sandlot.server")

#: Control.create: (project, request, may_be_privileged) -> the new sandbox's row.
Create = Callable[[str, CreateSandbox, bool], Awaitable[SandboxRow]]

FULL_ON_CRUN = (
    "FULL snapshots keep memory and processes, which needs a runtime that can checkpoint: "
    "create the sandbox with runtime='gvisor'. This sandbox runs on crun: take a FILESYSTEM "
    "snapshot instead"
)
FULL_NOT_YET = (
    "FULL snapshots of gvisor sandboxes are not available in this sandlot yet (a checkpoint "
    "restores only into the sandbox it came from: another one would need a copy of its disk "
    "in its own uid range, not made yet): take a FILESYSTEM snapshot instead"
)


#: Snapshots a project may keep (not deleted ones; forks' too): each holds host disk that no
#: sandbox quota counts. ``SANDLOT_MAX_SNAPSHOTS`` changes it.
DEFAULT_MAX_SNAPSHOTS = 100


class Snapshots:
    def __init__(self, core: Core, create: Create) -> None:
        self.core = core
        self._create = create
        self.max_per_project = int(os.environ.get("SANDLOT_MAX_SNAPSHOTS") or DEFAULT_MAX_SNAPSHOTS)

    async def _live_source(self, project: str, sandbox_id: str) -> SandboxRow:
        row = await self.core.db(self.core.store.get_any_sandbox, sandbox_id)
        if row is None or row.project != project:
            raise ApiError(404, "not_found", f"sandbox {sandbox_id} not found")
        if row.status == SandboxStatus.DELETED:
            raise ApiError(
                409, "deleted", f"sandbox {sandbox_id} was deleted: there is nothing to snapshot"
            )
        if row.status not in LIVE_STATUSES or row.status == SandboxStatus.CREATING:
            raise ApiError(409, "conflict", f"sandbox {sandbox_id} is {row.status}: not yet")
        return row  # type: ignore[no-any-return]

    def _engine(self, row: SandboxRow) -> Snapshotter:
        engine = self.core.engines.get(row.region)
        if not isinstance(engine, Snapshotter):
            raise ApiError(400, "unsupported", f"the {row.region} engine keeps no snapshots")
        return engine

    async def create(
        self, project: str, sandbox_id: str, req: CreateSnapshot, *, ephemeral: bool = False
    ) -> SnapshotRow:
        source = await self._live_source(project, sandbox_id)
        if req.snapshot_type == "full":
            runtime = source.runtime or "crun"
            raise ApiError(400, "unsupported", FULL_ON_CRUN if runtime == "crun" else FULL_NOT_YET)
        engine = self._engine(source)
        kept = await self.core.db(self.core.store.list_snapshots, project)
        if len(kept) >= self.max_per_project:
            raise ApiError(
                429,
                "quota_exceeded",
                f"project {project!r} keeps {len(kept)} snapshots, the most a project may "
                f"(SANDLOT_MAX_SNAPSHOTS={self.max_per_project}): delete some first",
            )
        await self._check_disk_quota(project, kept)
        row = SnapshotRow(
            id=secrets.token_hex(12),
            project=project,
            name=req.name,
            sandbox_id=sandbox_id,
            region=source.region,
            snapshot_type=req.snapshot_type,
            status=SnapshotStatus.CREATING,
            image=source.image,
            labels=dict(req.labels or {}),
            messages=[],
            ephemeral=ephemeral,
            created_at=utcnow(),
        )
        await self.core.db(self.core.store.add_snapshot, row)
        background = self.core.background
        if background is not None and not req.wait_available:
            background.start_soon(self._make, engine, row)
            return row
        with anyio.CancelScope(shield=True):  # the copy, once begun, completes or fails
            row = await self._make(engine, row, raise_errors=True)
        return row

    async def _check_disk_quota(self, project: str, kept: list[SnapshotRow]) -> None:
        """A project's disk quota (``sandlot quota set --disk``) holds its sandboxes' disks
        and its snapshots: a new snapshot is refused once they fill it."""
        quota = await self.core.db(self.core.store.get_quota, project)
        if quota is None or quota.disk_mb is None:
            return
        usage = await self.core.db(self.core.store.usage, project)
        held = usage.disk_mb + sum(r.size or 0 for r in kept) / 2**20
        if held >= quota.disk_mb:
            raise ApiError(
                429,
                "quota_exceeded",
                f"project {project!r} is at its disk quota ({quota.disk_mb} MiB): its sandboxes' "
                f"disks and snapshots hold {held:.0f} MiB (delete snapshots or sandboxes, or "
                "raise it: sandlot quota set)",
            )

    async def _make(
        self, engine: Snapshotter, row: SnapshotRow, raise_errors: bool = False
    ) -> SnapshotRow:
        try:
            info = await engine.snapshot(row.sandbox_id, row.id)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, EngineError) else type(exc).__name__
            if not isinstance(exc, EngineError):
                log.exception("snapshot %s of sandbox %s failed", row.id, row.sandbox_id)
            await self.core.db(
                self.core.store.update_snapshot,
                row.id,
                status=SnapshotStatus.FAILED,
                messages=[f"snapshot failed: {reason}"],
            )
            if not raise_errors:
                return row
            if isinstance(exc, InsufficientResources):
                raise ApiError(507, "insufficient_storage", reason) from exc
            if isinstance(exc, SandboxNotFound):
                raise ApiError(409, "deleted", f"sandbox {row.sandbox_id} is gone") from exc
            if isinstance(exc, EngineError):
                raise ApiError(400, "snapshot_failed", f"snapshot failed: {reason}") from exc
            raise
        made = await self.core.db(
            self.core.store.update_snapshot,
            row.id,
            status=SnapshotStatus.AVAILABLE,
            size=info.size,
            messages=list(info.messages),
            available_at=utcnow(),
        )
        await self.core.event(row.sandbox_id, "snapshot", f"{row.id} ({row.name})")
        return made  # type: ignore[no-any-return]

    async def get(self, project: str, snapshot_id: str) -> SnapshotRow:
        row = await self.core.db(self.core.store.get_snapshot, snapshot_id, project)
        if row is None:
            raise ApiError(404, "not_found", f"snapshot {snapshot_id} not found")
        return row  # type: ignore[no-any-return]

    async def usable(self, project: str, snapshot_id: str) -> SnapshotRow:
        """The snapshot a create spawns from: this project's, and available. Named by its id,
        or by its name when that is unambiguous (Koyeb's SDK takes either)."""
        row = await self.core.db(self.core.store.get_snapshot, snapshot_id, project)
        if row is None:
            named = [
                r
                for r in await self.core.db(self.core.store.list_snapshots, project)
                if r.name == snapshot_id
            ]
            if len(named) > 1:
                raise ApiError(
                    409,
                    "conflict",
                    f"{len(named)} snapshots are named {snapshot_id!r}: give the id of one",
                )
            row = named[0] if named else await self.get(project, snapshot_id)
        assert isinstance(row, SnapshotRow)
        if row.status != SnapshotStatus.AVAILABLE:
            raise ApiError(
                409, "conflict", f"snapshot {snapshot_id} is {row.status}: it cannot be spawned"
            )
        return row

    async def delete(self, project: str, snapshot_id: str) -> SnapshotRow:
        row = await self.get(project, snapshot_id)
        if row.status == SnapshotStatus.DELETED:
            raise ApiError(404, "not_found", f"snapshot {snapshot_id} was already deleted")
        if row.status == SnapshotStatus.CREATING:
            raise ApiError(409, "conflict", f"snapshot {snapshot_id} is still being created")
        engine = self.core.engines.get(row.region)
        if isinstance(engine, Snapshotter):
            try:
                await engine.delete_snapshot(snapshot_id)
            except SnapshotNotFound:
                pass  # a failed snapshot has no files
            except SnapshotInUse as exc:
                raise ApiError(409, "in_use", str(exc)) from exc
        done = await self.core.db(
            self.core.store.update_snapshot,
            snapshot_id,
            status=SnapshotStatus.DELETED,
            deleted_at=utcnow(),
        )
        return done  # type: ignore[no-any-return]

    async def release(self, snapshot_id: str | None) -> None:
        """After a sandbox's delete: a fork's snapshot goes with its last sandbox."""
        if not snapshot_id:
            return
        snapshot = await self.core.db(self.core.store.get_snapshot, snapshot_id)
        if snapshot is None or not snapshot.ephemeral:
            return
        if snapshot.status != SnapshotStatus.AVAILABLE:
            return
        if await self.core.db(self.core.store.sandboxes_from_snapshot, snapshot.id):
            return
        try:
            await self.delete(snapshot.project, snapshot.id)
        except ApiError as exc:  # still used by another snapshot: kept
            log.info("fork snapshot %s kept: %s", snapshot.id, exc.message)

    async def fork(
        self,
        project: str,
        sandbox_id: str,
        n: int,
        wait_ready: bool,
        timeout: float,
        may_be_privileged: bool = False,
    ) -> list[SandboxRow]:
        """``n`` new sandboxes from this one's filesystem as it is now, each with its own
        secret, network namespace and lifecycle, and the source's options."""
        source = await self._live_source(project, sandbox_id)
        name = f"fork-{sandbox_id[:12]}-{secrets.token_hex(3)}"
        snap = await self.create(
            project, sandbox_id, CreateSnapshot.model_validate({"name": name}), ephemeral=True
        )
        req = _options_of(source, self.core.store.sandbox_env(source))
        made: list[SandboxRow] = []
        try:
            for _ in range(n):
                fields: dict[str, Any] = {
                    "snapshot": snap.id,
                    "name": f"{source.name[:48]}-fork-{secrets.token_hex(3)}".strip("-"),
                    "wait_ready": wait_ready,
                    "timeout": timeout,
                }
                new = req.model_copy(update=fields)
                made.append(await self._create(project, new, may_be_privileged))
        except BaseException:
            with anyio.CancelScope(shield=True):
                for row in made:
                    await self.core.discard(
                        self.core.engines[row.region], row.id, "the fork it belonged to failed"
                    )
                await self.release(snap.id)
            raise
        return made


def _options_of(row: SandboxRow, env: dict[str, str]) -> CreateSandbox:
    """The create options of ``row``, for its forks."""
    return CreateSandbox.model_validate(
        {
            "instance_type": row.instance_type,
            "exposed_port_protocol": row.exposed_port_protocol,
            "env": env or None,
            "region": row.region,
            "idle_timeout": row.idle_timeout,
            "enable_tcp_proxy": row.enable_tcp_proxy,
            "protect_ports": bool(row.protect_ports),
            "privileged": row.privileged,
            "runtime": row.runtime or "crun",
            "delete_after_delay": row.delete_after_delay,
            "delete_after_inactivity_delay": row.delete_after_inactivity_delay,
            "enable_light_sleep": row.light_sleep,
            "command": row.command,
            "deep_sleep_value": row.deep_sleep_after,
            "labels": dict(row.labels or {}) or None,
            "block_network": False
            if row.network == "outbound" and not row.outbound_allowlist
            else None,
            "outbound_allowlist": list(row.outbound_allowlist) if row.outbound_allowlist else None,
        }
    )
