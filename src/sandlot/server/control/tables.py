"""The server's tables (SQLAlchemy 2 ORM models) and the values they hold: sandboxes and their
history, API tokens, registry secrets, quotas. Queries are :mod:`.store`'s."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal, get_args

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sandlot.instance_types import INSTANCE_TYPES
from sandlot.server.status import SandboxStatus

DEFAULT_PROJECT = "default"

#: What an API token may do. ``normal``: its project's sandboxes, secrets and quota (read);
#: ``privileged``: also privileged sandboxes; ``admin``: also tokens and quotas of every project
#: (what the local socket's owner does, over TCP). Host paths as images stay the socket's.
Scope = Literal["normal", "privileged", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
#: Sandbox statuses that hold resources a quota counts (everything not deleted, asleep too).
UNCOUNTED_STATUSES = (SandboxStatus.DELETED, SandboxStatus.POOLING, SandboxStatus.POOLED)


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
    #: One of :data:`SCOPES` (tokens made before scopes existed are ``normal``).
    scope: Mapped[str] = mapped_column(String(16), default="normal")
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
    #: The sandbox's environment (often API keys): sealed as ``{"=sealed": ...}`` by
    #: :meth:`Store.seal_env`, read with :meth:`Store.sandbox_env`.
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    #: The agent secret, at rest: "" means derived from the id by the server key (every sandbox
    #: this server makes); else sealed by it (a secret made before derivation, kept because the
    #: agent holds it). Read it with :meth:`Store.sandbox_secret`.
    secret_sealed: Mapped[str] = mapped_column("secret", String(256), default="")
    privileged: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The isolation runtime (engines.base.RUNTIMES); None: made before there was a choice (crun).
    runtime: Mapped[str | None] = mapped_column(String(16), nullable=True, default="crun")
    exposed_port_protocol: Mapped[str] = mapped_column(String(16), default="http")
    enable_tcp_proxy: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Exposed ports: {"8080": {"since": iso time, "protected": bool}} (see
    #: server/gateway/ports/registry.py); a protected port's token is derived
    #: (:meth:`Store.port_token`), or sealed (``token_sealed``) if an older sandlot chose it
    #: at random.
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
    #: The snapshot it was spawned from (None: made from its image).
    snapshot_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: Its main process (a sh -c line), or None.
    command: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: With light sleep: seconds asleep before deep sleep (None: lifecycle's default).
    deep_sleep_after: Mapped[int | None] = mapped_column(Integer, nullable=True)


class SnapshotRow(Base):
    """A snapshot of a sandbox's filesystem (its files are the engine's: images/snapshots.py)."""

    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    #: The sandbox it was taken of (Koyeb calls it the service).
    sandbox_id: Mapped[str] = mapped_column(String(64), index=True)
    region: Mapped[str] = mapped_column(String(64))
    #: "filesystem" or "full" (Koyeb's SnapshotType values).
    snapshot_type: Mapped[str] = mapped_column(String(16))
    #: One of Koyeb's SnapshotStatus values (sandlot.server.status.SnapshotStatus).
    status: Mapped[str] = mapped_column(String(16), index=True)
    #: The base image of its layers: what spawned sandboxes show as their image.
    image: Mapped[str] = mapped_column(Text)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    messages: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: Made by a fork: removed once the last sandbox spawned from it is deleted.
    ephemeral: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    available_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
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

    Unlike API tokens they are sent to the registry, so they cannot be hashed: the password is
    sealed with the server key (:meth:`Store.registry_password` opens it). The API never
    returns it."""

    __tablename__ = "registry_secrets"
    __table_args__ = (UniqueConstraint("project", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(64))
    #: ``host[:port]`` (``docker.io`` for Docker Hub): the only registry these are sent to.
    host: Mapped[str] = mapped_column(String(255))
    username: Mapped[str] = mapped_column(String(255))
    password_sealed: Mapped[str] = mapped_column("password", Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ProjectQuota(Base):
    """A project's limits (None: unlimited), checked at every create and warm-pool claim."""

    __tablename__ = "project_quotas"

    project: Mapped[str] = mapped_column(String(128), primary_key=True)
    max_sandboxes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    memory_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    vcpu: Mapped[float | None] = mapped_column(Float, nullable=True)
    disk_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ServerMeta(Base):
    """Facts about the database itself (the fingerprint of the key its secrets are sealed by)."""

    __tablename__ = "server_meta"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class Usage:
    """What a project holds: its counted sandboxes and their instance types' sizes."""

    sandboxes: int = 0
    memory_mb: int = 0
    vcpu: float = 0.0
    disk_mb: int = 0

    def plus(self, instance_type: str) -> Usage:
        t = INSTANCE_TYPES[instance_type]
        return Usage(
            self.sandboxes + 1,
            self.memory_mb + t.memory_mb,
            self.vcpu + t.vcpu,
            self.disk_mb + t.disk_mb,
        )


#: Sealed columns' names: the associated data that binds a sealed value to its column.
SANDBOX_SECRET_COLUMN = "sandboxes.secret"
REGISTRY_PASSWORD_COLUMN = "registry_secrets.password"
PORT_TOKEN_COLUMN = "sandboxes.exposed_ports.token"
ENV_COLUMN = "sandboxes.env"
#: The one key of a sealed ``env`` (no environment variable can be named so: it holds "=").
SEALED_ENV_KEY = "=sealed"
