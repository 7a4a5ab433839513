"""The server's state, through SQLAlchemy 2: SQLite by default, PostgreSQL by URL. The tables are
:mod:`.tables`; SQLite's own files, :mod:`.sqlitefiles`.

Calls are synchronous and short; the async routes run them in a worker thread
(:func:`anyio.to_thread.run_sync`) so a slow database never blocks the gateway's event loop.

Nothing recoverable is stored in clear (see :mod:`.serverkey`): API tokens are hashed, agent
secrets and port tokens are derived from the server key, registry passwords and sandboxes'
environments are sealed with it. A SQLite database and its ``-wal``/``-shm`` files are 0600,
whatever they were before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import (
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sandlot.instance_types import INSTANCE_TYPES
from sandlot.server.control import migrate
from sandlot.server.control.serverkey import ServerKey
from sandlot.server.control.sqlitefiles import (
    DatabaseFull,
    DiskReserve,
    default_key_file,
    is_disk_full,
    secure_sqlite_files,
    sqlite_path,
    sqlite_pragmas,
)
from sandlot.server.control.tables import (
    ENV_COLUMN,
    PORT_TOKEN_COLUMN,
    REGISTRY_PASSWORD_COLUMN,
    SANDBOX_SECRET_COLUMN,
    SCOPES,
    SEALED_ENV_KEY,
    UNCOUNTED_STATUSES,
    ApiToken,
    Base,
    ProjectQuota,
    RegistrySecret,
    SandboxEvent,
    SandboxRow,
    Scope,
    SnapshotRow,
    Usage,
    utcnow,
)
from sandlot.server.status import SandboxStatus, SnapshotStatus

log = logging.getLogger("sandlot.server")


class QuotaExceeded(Exception):
    """A create or claim would take a project past one of its quotas (the message says which,
    with the usage)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """All database access. Rows leave as detached ORM objects (``expire_on_commit=False``).

    ``key_file``: the server key (default: :func:`default_key_file`, created if missing); a
    file named explicitly must exist (it is shared, e.g. a mounted Kubernetes Secret)."""

    def __init__(self, url: str, key_file: Path | None = None) -> None:
        # First: a missing or unreadable key stops the start before anything is created.
        self.key = ServerKey.load(key_file or default_key_file(url), create=key_file is None)
        kwargs: dict[str, Any] = {}
        self.reserve: DiskReserve | None = None
        db_path = sqlite_path(url)
        if db_path is not None:
            secure_sqlite_files(db_path)
            self.reserve = DiskReserve(db_path.with_name(db_path.name + ".reserve"))
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        elif url.startswith("postgresql://"):
            # psycopg 3 is the driver we ship against; plain URLs would pick psycopg2.
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        self.engine: SAEngine = create_engine(url, pool_pre_ping=True, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", sqlite_pragmas)
            event.listen(self.engine, "handle_error", self._on_error)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        #: Quota check and insert are one step (for SQLite, one process; PostgreSQL also locks
        #: the project's quota row, for replicas).
        self._admit_lock = threading.Lock()
        Base.metadata.create_all(self.engine)
        migrate.upgrade(self.engine, self.session, self.key, self.seal_env)
        if db_path is not None:
            secure_sqlite_files(db_path)  # the WAL and -shm files exist now

    def seal_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """What the ``env`` column holds for ``env``."""
        if not env:
            return {}
        return {SEALED_ENV_KEY: self.key.seal(json.dumps(dict(env)), ENV_COLUMN)}

    def sandbox_env(self, row: SandboxRow) -> dict[str, str]:
        env = row.env or {}
        if SEALED_ENV_KEY not in env:
            return dict(env)
        opened: dict[str, str] = json.loads(self.key.open(env[SEALED_ENV_KEY], ENV_COLUMN))
        return opened

    def port_token(self, sandbox_id: str, port: int, info: Mapping[str, Any]) -> str | None:
        """An exposed port's token (None: the port is public)."""
        if info.get("token_sealed"):
            return self.key.open(str(info["token_sealed"]), PORT_TOKEN_COLUMN)
        if info.get("protected"):
            return self.key.derive("port-token", f"{sandbox_id}:{port}:{info.get('since', '')}")
        return None

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        if self.reserve is not None:
            self.reserve.rearm_if_room()
        return self._sessions()

    def _on_error(self, context: Any) -> None:
        """A write that failed for want of disk: release the reserve (the next try has room)
        and say so with an error the API turns into a 507."""
        if is_disk_full(context.original_exception):
            released = self.reserve is not None and self.reserve.release()
            raise DatabaseFull(
                "the server's disk is full"
                + ("; retry (its reserve was just released)" if released else "")
            ) from context.original_exception

    # -- tokens -------------------------------------------------------------------------------

    def create_token(
        self, project: str, name: str, scope: Scope = "normal"
    ) -> tuple[ApiToken, str]:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        token = "sl_" + secrets.token_urlsafe(32)  # control.API_TOKEN_PREFIX
        row = ApiToken(
            id="tok_" + secrets.token_hex(8),
            project=project,
            name=name,
            token_hash=hash_token(token),
            scope=scope,
            created_at=utcnow(),
        )
        with self.session() as s, s.begin():
            s.add(row)
        return row, token

    def token_row(self, token: str) -> ApiToken | None:
        """The live (not revoked) token row for this token, if any."""
        with self.session() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
            if row is None or row.revoked_at is not None:
                return None
            return row

    def project_for_token(self, token: str) -> str | None:
        row = self.token_row(token)
        return row.project if row is not None else None

    def list_tokens(self, project: str | None) -> list[ApiToken]:
        with self.session() as s:
            q = select(ApiToken).order_by(ApiToken.created_at)
            if project is not None:
                q = q.where(ApiToken.project == project)
            return list(s.scalars(q))

    def revoke_token(self, token_id: str) -> ApiToken | None:
        with self.session() as s, s.begin():
            row = s.get(ApiToken, token_id)
            if row is None or row.revoked_at is not None:
                return None
            row.revoked_at = utcnow()
            return row

    # -- registry secrets ---------------------------------------------------------------------

    def add_registry_secret(
        self, project: str, name: str, host: str, username: str, password: str
    ) -> RegistrySecret | None:
        """The new secret, or None when the project already has one of that name."""
        row = RegistrySecret(
            project=project,
            name=name,
            host=host,
            username=username,
            password_sealed=self.key.seal(password, REGISTRY_PASSWORD_COLUMN),
            created_at=utcnow(),
        )
        try:
            with self.session() as s, s.begin():
                s.add(row)
        except IntegrityError:
            return None
        return row

    def get_registry_secret(self, project: str, name: str) -> RegistrySecret | None:
        with self.session() as s:
            return s.scalar(
                select(RegistrySecret).where(
                    RegistrySecret.project == project, RegistrySecret.name == name
                )
            )

    def registry_password(self, row: RegistrySecret) -> str:
        return self.key.open(row.password_sealed, REGISTRY_PASSWORD_COLUMN)

    def list_registry_secrets(self, project: str) -> list[RegistrySecret]:
        with self.session() as s:
            q = select(RegistrySecret).where(RegistrySecret.project == project)
            return list(s.scalars(q.order_by(RegistrySecret.name)))

    def delete_registry_secret(self, project: str, name: str) -> RegistrySecret | None:
        """The deleted secret, or None if there was none of that name."""
        with self.session() as s, s.begin():
            row = s.scalar(
                select(RegistrySecret).where(
                    RegistrySecret.project == project, RegistrySecret.name == name
                )
            )
            if row is not None:
                s.delete(row)
            return row

    # -- sandboxes ----------------------------------------------------------------------------

    def sandbox_secret(self, row: SandboxRow) -> str:
        """The agent secret of a sandbox (derived from its id, or opened)."""
        if not row.secret_sealed:
            return self.key.derive("sandbox-secret", row.id)
        return self.key.open(row.secret_sealed, SANDBOX_SECRET_COLUMN)

    def add_sandbox(self, row: SandboxRow, check_quota: bool = False) -> None:
        """Insert ``row``; with ``check_quota``, only if its project's quota allows one more
        of its instance type (else :class:`QuotaExceeded`)."""
        with self._admit_lock, self.session() as s, s.begin():
            if check_quota:
                self._admit(s, row.project, row.instance_type)
            s.add(row)

    def get_any_sandbox(self, sandbox_id: str) -> SandboxRow | None:
        """A sandbox row whatever its status (deleted ones included)."""
        with self.session() as s:
            return s.get(SandboxRow, sandbox_id)

    def get_sandbox(self, sandbox_id: str, project: str | None = None) -> SandboxRow | None:
        """A live (not deleted) sandbox; with ``project``, only if it belongs to it."""
        with self.session() as s:
            row = s.get(SandboxRow, sandbox_id)
            if row is None or row.status == SandboxStatus.DELETED:
                return None
            if project is not None and row.project != project:
                return None
            return row

    def list_sandboxes(
        self, project: str, name: str | None = None, labels: Mapping[str, str] | None = None
    ) -> list[SandboxRow]:
        with self.session() as s:
            q = (
                select(SandboxRow)
                .where(SandboxRow.project == project, SandboxRow.status != SandboxStatus.DELETED)
                .order_by(SandboxRow.created_at)
            )
            if name is not None:
                q = q.where(SandboxRow.name == name)
            rows = list(s.scalars(q))
        if labels:
            # Label filtering in Python: JSON operators differ between SQLite and PostgreSQL,
            # and a project's live sandboxes are few.
            rows = [r for r in rows if all(r.labels.get(k) == v for k, v in labels.items())]
        return rows

    def update_sandbox(
        self, sandbox_id: str, only_if_status: str | None = None, **fields: Any
    ) -> SandboxRow | None:
        """Set ``fields``; with ``only_if_status``, only if the row still has that status (the
        row is returned unchanged otherwise)."""
        with self.session() as s, s.begin():
            row = s.get(SandboxRow, sandbox_id, with_for_update=only_if_status is not None)
            if row is None:
                return None
            if only_if_status is not None and row.status != only_if_status:
                return row
            for key, value in fields.items():
                setattr(row, key, value)
            row.updated_at = utcnow()
            return row

    def change_exposed_ports(
        self, sandbox_id: str, change: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """Read-modify-write of a sandbox's exposed ports, under the row's lock (two exposes
        at once must both see the other's); ``{}`` if there is no such sandbox."""
        with self.session() as s, s.begin():
            row = s.get(SandboxRow, sandbox_id, with_for_update=True)
            if row is None:
                return {}
            ports = dict(row.exposed_ports or {})
            change(ports)
            row.exposed_ports = ports
            row.updated_at = utcnow()
            return ports

    def claim_pooled(
        self, pool_project: str, image: str, instance_type: str, **fields: Any
    ) -> SandboxRow | None:
        """Atomically take the oldest ready pooled sandbox of this kind and set ``fields``
        (the claiming project's quota is checked first: :class:`QuotaExceeded`)."""
        with self._admit_lock, self.session() as s, s.begin():
            self._admit(s, fields["project"], instance_type)
            query = (
                select(SandboxRow)
                .where(
                    SandboxRow.project == pool_project,
                    SandboxRow.status == SandboxStatus.POOLED,
                    SandboxRow.image == image,
                    SandboxRow.instance_type == instance_type,
                )
                .order_by(SandboxRow.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            row = s.scalars(query).first()
            if row is None:
                return None
            for key, value in fields.items():
                setattr(row, key, value)
            row.updated_at = utcnow()
            return row

    def count_pooled(self, pool_project: str, image: str, instance_type: str) -> int:
        """Pooled sandboxes of this kind, ready or being made."""
        with self.session() as s:
            query = select(SandboxRow.id).where(
                SandboxRow.project == pool_project,
                SandboxRow.status.in_([SandboxStatus.POOLED, SandboxStatus.POOLING]),
                SandboxRow.image == image,
                SandboxRow.instance_type == instance_type,
            )
            return len(s.scalars(query).all())

    def add_event(self, sandbox_id: str, kind: str, detail: str = "") -> None:
        with self.session() as s, s.begin():
            s.add(SandboxEvent(sandbox_id=sandbox_id, kind=kind, detail=detail, at=utcnow()))

    def list_events(self, sandbox_id: str) -> list[SandboxEvent]:
        with self.session() as s:
            query = (
                select(SandboxEvent)
                .where(SandboxEvent.sandbox_id == sandbox_id)
                .order_by(SandboxEvent.id)
            )
            return list(s.scalars(query))

    def sandboxes_with_status(self, statuses: Iterable[str]) -> list[SandboxRow]:
        with self.session() as s:
            return list(s.scalars(select(SandboxRow).where(SandboxRow.status.in_(list(statuses)))))

    # -- snapshots ----------------------------------------------------------------------------

    def add_snapshot(self, row: SnapshotRow) -> None:
        with self.session() as s, s.begin():
            s.add(row)

    def get_snapshot(self, snapshot_id: str, project: str | None = None) -> SnapshotRow | None:
        """A snapshot (deleted ones too); with ``project``, only if it belongs to it."""
        with self.session() as s:
            row = s.get(SnapshotRow, snapshot_id)
            if row is None or (project is not None and row.project != project):
                return None
            return row

    def list_snapshots(
        self,
        project: str,
        sandbox_id: str | None = None,
        snapshot_type: str | None = None,
        status: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[SnapshotRow]:
        """The project's snapshots, oldest first; deleted ones only when ``status`` asks."""
        with self.session() as s:
            q = select(SnapshotRow).where(SnapshotRow.project == project)
            if status is not None:
                q = q.where(SnapshotRow.status == status)
            else:
                q = q.where(SnapshotRow.status != SnapshotStatus.DELETED)
            if sandbox_id is not None:
                q = q.where(SnapshotRow.sandbox_id == sandbox_id)
            if snapshot_type is not None:
                q = q.where(SnapshotRow.snapshot_type == snapshot_type)
            rows = list(s.scalars(q.order_by(SnapshotRow.created_at)))
        if labels:
            rows = [r for r in rows if all(r.labels.get(k) == v for k, v in labels.items())]
        return rows

    def update_snapshot(self, snapshot_id: str, **fields: Any) -> SnapshotRow | None:
        with self.session() as s, s.begin():
            row = s.get(SnapshotRow, snapshot_id, with_for_update=True)
            if row is None:
                return None
            for key, value in fields.items():
                setattr(row, key, value)
            return row

    def snapshots_with_status(self, statuses: Iterable[str]) -> list[SnapshotRow]:
        with self.session() as s:
            q = select(SnapshotRow).where(SnapshotRow.status.in_(list(statuses)))
            return list(s.scalars(q))

    def sandboxes_from_snapshot(self, snapshot_id: str) -> list[SandboxRow]:
        """Live sandboxes spawned from a snapshot."""
        with self.session() as s:
            q = select(SandboxRow).where(
                SandboxRow.snapshot_id == snapshot_id, SandboxRow.status != SandboxStatus.DELETED
            )
            return list(s.scalars(q))

    # -- quotas -------------------------------------------------------------------------------

    def _admit(self, s: Session, project: str, instance_type: str) -> None:
        quota = s.get(ProjectQuota, project, with_for_update=True)
        if quota is None:
            return
        used = self._usage(s, project)
        after = used.plus(instance_type)
        checks: list[tuple[str, float, float | None, str]] = [
            ("max_sandboxes", after.sandboxes, quota.max_sandboxes, ""),
            ("memory", after.memory_mb, quota.memory_mb, " MiB"),
            ("cpu", after.vcpu, quota.vcpu, " vCPU"),
            ("disk", after.disk_mb, quota.disk_mb, " MiB"),
        ]
        now: dict[str, float] = {"max_sandboxes": used.sandboxes, "memory": used.memory_mb}
        now |= {"cpu": used.vcpu, "disk": used.disk_mb}
        for name, wanted, limit, unit in checks:
            if limit is not None and wanted > limit + 1e-9:
                raise QuotaExceeded(
                    f"project {project!r} is over its {name} quota: {now[name]:g}{unit} in use, "
                    f"a {instance_type} sandbox needs {wanted - now[name]:g}{unit} more, the "
                    f"quota is {limit:g}{unit} (delete sandboxes, or raise it: sandlot quota set)"
                )

    @staticmethod
    def _usage(s: Session, project: str) -> Usage:
        types = s.scalars(
            select(SandboxRow.instance_type).where(
                SandboxRow.project == project, SandboxRow.status.not_in(UNCOUNTED_STATUSES)
            )
        )
        usage = Usage()
        for name in types:
            usage = usage.plus(name) if name in INSTANCE_TYPES else usage
        return usage

    def usage(self, project: str) -> Usage:
        with self.session() as s:
            return self._usage(s, project)

    def projects_in_use(self) -> list[str]:
        """Projects holding sandboxes or having a quota (warm pools excluded)."""
        with self.session() as s:
            held = s.scalars(
                select(SandboxRow.project)
                .where(SandboxRow.status.not_in(UNCOUNTED_STATUSES))
                .distinct()
            )
            quoted = s.scalars(select(ProjectQuota.project))
            return sorted(set(held) | set(quoted))

    def get_quota(self, project: str) -> ProjectQuota | None:
        with self.session() as s:
            return s.get(ProjectQuota, project)

    def set_quota(self, project: str, **limits: Any) -> ProjectQuota:
        """Set the given limits (None: unlimited); the others keep their values."""
        with self.session() as s, s.begin():
            row = s.get(ProjectQuota, project, with_for_update=True)
            if row is None:
                row = ProjectQuota(project=project)
                s.add(row)
            for key, value in limits.items():
                setattr(row, key, value)
            row.updated_at = utcnow()
            return row

    def delete_quota(self, project: str) -> bool:
        with self.session() as s, s.begin():
            row = s.get(ProjectQuota, project)
            if row is not None:
                s.delete(row)
            return row is not None
