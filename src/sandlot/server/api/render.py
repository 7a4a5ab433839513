"""The API's one view of each kind of row: a sandbox (its URLs, domain, secret and env opened
here), an exposed port, a token, a quota, a secret. Every handler answers through this module,
so that no answer can leave out what another gives (one once lost the configured domain)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from sandlot.server.api.auth import via_admin_socket
from sandlot.server.config import ServerConfig, unix_public_url
from sandlot.server.control.store import Store
from sandlot.server.control.tables import (
    ApiToken,
    ProjectQuota,
    RegistrySecret,
    SandboxEvent,
    SandboxRow,
    SnapshotRow,
    Usage,
)
from sandlot.server.gateway.ports.router import normal_domain
from sandlot.server.redact import hide_host_paths
from sandlot.server.schemas import (
    EventOut,
    ExposedPortOut,
    QuotaOut,
    QuotaUsage,
    SandboxOut,
    SecretOut,
    SnapshotOut,
    TokenOut,
)
from sandlot.server.status import SandboxStatus


def iso(value: Any) -> str:
    return value.isoformat() if value is not None else ""


class Renderer:
    """Rows as the API shows them, for one server (its public URL and domain)."""

    def __init__(self, config: ServerConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.domain = normal_domain(config.domain)

    def base(self, request: Request) -> str:
        """The server's URL as this client reaches it (``--public-url``, else the socket's
        or the request's own)."""
        config = self.config
        if config.public_url:
            return config.public_url.rstrip("/")
        if config.admin_socket is not None and via_admin_socket(request, config):
            return unix_public_url(config.admin_socket)
        return str(request.base_url).rstrip("/")

    def ports_base(self, request: Request) -> str:
        """Base of exposed ports' path-form URLs: the ports-only listener's when there is one
        (a Unix-socket server's ports then open in any browser or curl), else :meth:`base`."""
        if self.config.ports_url:
            return self.config.ports_url.rstrip("/")
        return self.base(request)

    def domain_for(self, base: str) -> str:
        """Where exposed ports are served: the wildcard domain, else the server's host."""
        return self.domain or base.split("://", 1)[-1]

    def sandbox(self, row: SandboxRow, request: Request, with_secret: bool) -> SandboxOut:
        """The API's view of a sandbox; its secret (on create, get and update) and env are
        opened here."""
        base = self.base(request)
        return SandboxOut(
            id=row.id,
            name=row.name,
            status=row.status,  # type: ignore[arg-type]
            sleep_kind=row.sleep_kind if row.status == SandboxStatus.SLEEPING else None,  # type: ignore[arg-type]
            last_activity_at=iso(row.last_activity_at) if row.last_activity_at else None,
            image=row.image,
            instance_type=row.instance_type,
            region=row.region,
            created_at=iso(row.created_at),
            updated_at=iso(row.updated_at),
            labels=row.labels or {},
            env=self.store.sandbox_env(row),
            sandbox_url=f"{base}/sandboxes/{row.id}/koyeb-sandbox",
            domain=self.domain_for(self.ports_base(request)),
            privileged=row.privileged,
            runtime=row.runtime or "crun",
            exposed_port_protocol=row.exposed_port_protocol,
            enable_tcp_proxy=row.enable_tcp_proxy,
            idle_timeout=row.idle_timeout,
            delete_after_delay=row.delete_after_delay,
            delete_after_inactivity_delay=row.delete_after_inactivity_delay,
            enable_light_sleep=row.light_sleep,
            network=row.network or "none",  # type: ignore[arg-type]
            outbound_allowlist=row.outbound_allowlist,
            error=hide_host_paths(row.error or ""),
            secret=self.store.sandbox_secret(row) if with_secret else None,
            command=row.command,
            snapshot=row.snapshot_id,
        )

    def port(
        self, base: str, sandbox_id: str, port: int, info: dict[str, Any], protocol: str
    ) -> ExposedPortOut:
        """An exposed port: its path-form URL, its host-form URL (with a domain), its token."""
        host_url = None
        if self.domain is not None:
            scheme = "https" if base.startswith("https:") else "http"
            host_url = f"{scheme}://{port}-{sandbox_id}.{self.domain}/"
        return ExposedPortOut(
            port=port,
            exposed_at=f"{base}/sandboxes/{sandbox_id}/ports/{port}/",
            host_url=host_url,
            protocol=protocol,
            token=self.store.port_token(sandbox_id, port, info),
            since=str(info.get("since", "")),
        )

    @staticmethod
    def event(row: SandboxEvent) -> EventOut:
        return EventOut(at=iso(row.at), kind=row.kind, detail=hide_host_paths(row.detail or ""))

    @staticmethod
    def token(row: ApiToken, token: str | None = None) -> TokenOut:
        return TokenOut(
            id=row.id,
            project=row.project,
            name=row.name,
            scope=row.scope or "normal",  # type: ignore[arg-type]
            created_at=iso(row.created_at),
            revoked_at=iso(row.revoked_at) if row.revoked_at else None,
            token=token,
        )

    @staticmethod
    def quota(project: str, quota: ProjectQuota | None, used: Usage) -> QuotaOut:
        return QuotaOut(
            project=project,
            max_sandboxes=quota.max_sandboxes if quota else None,
            memory_mb=quota.memory_mb if quota else None,
            vcpu=quota.vcpu if quota else None,
            disk_mb=quota.disk_mb if quota else None,
            usage=QuotaUsage(
                sandboxes=used.sandboxes,
                memory_mb=used.memory_mb,
                vcpu=used.vcpu,
                disk_mb=used.disk_mb,
            ),
        )

    @staticmethod
    def secret(row: RegistrySecret) -> SecretOut:
        return SecretOut(
            name=row.name,
            type="registry",
            registry=row.host,
            username=row.username,
            created_at=iso(row.created_at),
        )

    @staticmethod
    def snapshot(row: SnapshotRow) -> SnapshotOut:
        return SnapshotOut(
            id=row.id,
            name=row.name,
            sandbox_id=row.sandbox_id,
            snapshot_type=row.snapshot_type,  # type: ignore[arg-type]
            status=row.status,  # type: ignore[arg-type]
            image=row.image,
            region=row.region,
            project_id=row.project,
            labels=row.labels or {},
            created_at=iso(row.created_at),
            available_at=iso(row.available_at) if row.available_at else None,
            size=row.size,
            messages=[hide_host_paths(m) for m in row.messages or []],
        )
