"""The server's state, through SQLAlchemy 2: SQLite by default, PostgreSQL by URL.

Calls are synchronous and short; the async routes run them in a worker thread
(:func:`anyio.to_thread.run_sync`) so a slow database never blocks the gateway's event loop.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

DEFAULT_PROJECT = "default"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    #: sha256 of the token. Tokens are 256-bit random strings, so a fast hash is enough
    #: (no dictionary to attack); the token itself is shown once, at creation.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SandboxRow(Base):
    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    image: Mapped[str] = mapped_column(Text)
    instance_type: Mapped[str] = mapped_column(String(32))
    region: Mapped[str] = mapped_column(String(64))
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    secret: Mapped[str] = mapped_column(String(128))
    privileged: Mapped[bool] = mapped_column(Boolean, default=False)
    exposed_port_protocol: Mapped[str] = mapped_column(String(16), default="http")
    enable_tcp_proxy: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Exposed ports: {"8080": {"since": iso time, "token": str | None}} (see server/ports.py).
    exposed_ports: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    protect_ports: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    registry_secret: Mapped[str | None] = mapped_column(String(256), nullable=True)
    # Lifecycle (stored now; the timers come with the lifecycle issue).
    idle_timeout: Mapped[int] = mapped_column(Integer, default=300)
    delete_after_delay: Mapped[int | None] = mapped_column(Integer, nullable=True)
    delete_after_inactivity_delay: Mapped[int | None] = mapped_column(Integer, nullable=True)
    light_sleep: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Lifecycle state: when traffic was last seen, when it fell asleep and how deeply.
    last_activity_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    slept_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    sleep_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    #: Egress policy: "none" or "outbound", and the allow-list (None: everywhere).
    network: Mapped[str | None] = mapped_column(String(16), nullable=True, default="none")
    outbound_allowlist: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # Where the agent answers (from the engine).
    agent_unix_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    agent_host: Mapped[str | None] = mapped_column(String(256), nullable=True)
    agent_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SandboxEvent(Base):
    """A sandbox's history: created, slept, woke, deleted, error (``sandlot events ID``)."""

    __tablename__ = "sandbox_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sandbox_id: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")


class RegistrySecret(Base):
    """Credentials for a private registry, named per project (``registry_secret=NAME``).

    Stored as given: unlike API tokens they are sent to the registry, so they cannot be
    hashed. The API never returns the password; the database file is the server's own (0600
    under the state directory for SQLite)."""

    __tablename__ = "registry_secrets"
    __table_args__ = (UniqueConstraint("project", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(64))
    #: ``host[:port]`` (``docker.io`` for Docker Hub): the only registry these are sent to.
    host: Mapped[str] = mapped_column(String(255))
    username: Mapped[str] = mapped_column(String(255))
    password: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def default_database_url(state: Path) -> str:
    return f"sqlite:///{state / 'sandlot.db'}"


class Store:
    """All database access. Rows leave as detached ORM objects (``expire_on_commit=False``)."""

    def __init__(self, url: str) -> None:
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        elif url.startswith("postgresql://"):
            # psycopg 3 is the driver we ship against; plain URLs would pick psycopg2.
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        self.engine: SAEngine = create_engine(url, pool_pre_ping=True, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        Base.metadata.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Bring a database made by an older sandlot up to date: new columns are all nullable
        or defaulted, so adding them is the whole migration."""
        inspector = inspect(self.engine)
        with self.engine.begin() as conn:
            for table in Base.metadata.sorted_tables:
                present = {c["name"] for c in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name not in present:
                        kind = column.type.compile(dialect=self.engine.dialect)
                        conn.execute(
                            text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
                        )

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return self._sessions()

    # -- tokens -------------------------------------------------------------------------------

    def create_token(self, project: str, name: str) -> tuple[ApiToken, str]:
        token = "sl_" + secrets.token_urlsafe(32)  # control.API_TOKEN_PREFIX
        row = ApiToken(
            id="tok_" + secrets.token_hex(8),
            project=project,
            name=name,
            token_hash=hash_token(token),
            created_at=utcnow(),
        )
        with self.session() as s, s.begin():
            s.add(row)
        return row, token

    def project_for_token(self, token: str) -> str | None:
        with self.session() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
            if row is None or row.revoked_at is not None:
                return None
            return row.project

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
            password=password,
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

    def add_sandbox(self, row: SandboxRow) -> None:
        with self.session() as s, s.begin():
            s.add(row)

    def get_any_sandbox(self, sandbox_id: str) -> SandboxRow | None:
        """A sandbox row whatever its status (deleted ones included)."""
        with self.session() as s:
            return s.get(SandboxRow, sandbox_id)

    def get_sandbox(self, sandbox_id: str, project: str | None = None) -> SandboxRow | None:
        """A live (not deleted) sandbox; with ``project``, only if it belongs to it."""
        with self.session() as s:
            row = s.get(SandboxRow, sandbox_id)
            if row is None or row.status == "deleted":
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
                .where(SandboxRow.project == project, SandboxRow.status != "deleted")
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

    def claim_pooled(
        self, pool_project: str, image: str, instance_type: str, **fields: Any
    ) -> SandboxRow | None:
        """Atomically take the oldest ready pooled sandbox of this kind and set ``fields``."""
        with self.session() as s, s.begin():
            query = (
                select(SandboxRow)
                .where(
                    SandboxRow.project == pool_project,
                    SandboxRow.status == "pooled",
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
                SandboxRow.status.in_(["pooled", "pooling"]),
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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers (the gateway's lookups) never wait for a writer (a create).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
