"""The control API's request and response bodies (pydantic): one definition serves validation,
serialisation and the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from sandlot.agent.commands import HIDDEN_ENV
from sandlot.engines.base import RUNTIMES
from sandlot.instance_types import DEFAULT_INSTANCE_TYPE, INSTANCE_TYPES
from sandlot.netpolicy import resolve_policy

NAME_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$"
PROJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_./-]{0,126}[A-Za-z0-9])?$"

#: The agent's own configuration (its secret, pool mode, journal, ...): a sandbox's env must not
#: set these. One list, the agent's: a name it adds is refused here too.
RESERVED_ENV = HIDDEN_ENV

NonNegativeInt = Annotated[int, Field(ge=0)]
#: Lifecycle timers: whole seconds, at most ten years (a larger value is a typo, not a plan).
TimerSeconds = Annotated[int, Field(ge=0, le=10 * 365 * 24 * 3600)]
NonNegativeSeconds = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    # strict: "1" is not an int and 1 is not a str; forbid: a misspelt option is an error,
    # not silently ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


def _check_labels(value: dict[str, str] | None) -> dict[str, str] | None:
    import re

    if value is None:
        return value
    if len(value) > 64:
        raise ValueError("at most 64 labels")
    for key, v in value.items():
        if not re.match(LABEL_KEY_PATTERN, key):
            raise ValueError(
                f"label key {key!r} must be 1-128 letters, digits, '_', '.', '/', '-' "
                "starting and ending with a letter or digit"
            )
        if len(v) > 256:
            raise ValueError(f"label {key!r}: value longer than 256 characters")
    return value


class CreateSandbox(_Strict):
    image: StrictStr | None = Field(
        None,
        description="Image to boot; default: sandlot's default image (koyeb/sandbox equivalent).",
    )
    name: StrictStr | None = Field(
        None, pattern=NAME_PATTERN, description="Shown in listings; default: the id."
    )
    wait_ready: StrictBool = Field(True, description="Answer only once the agent is healthy.")
    instance_type: StrictStr = Field(
        DEFAULT_INSTANCE_TYPE, description="One of: " + ", ".join(INSTANCE_TYPES)
    )
    exposed_port_protocol: Literal["http", "http2"] = "http"
    env: dict[StrictStr, StrictStr] | None = None
    region: StrictStr | None = Field(
        None, description="Which engine runs the sandbox; default: the server's default region."
    )
    timeout: NonNegativeSeconds = Field(
        300, description="Seconds to wait for readiness when wait_ready."
    )
    idle_timeout: TimerSeconds = Field(
        300, description="Seconds without traffic before sleep; 0 disables sleep."
    )
    enable_tcp_proxy: StrictBool = Field(
        False, description="A raw TCP listener relaying to the bound port (not with protect_ports)."
    )
    protect_ports: StrictBool = Field(
        False,
        description="Exposed ports need a per-port token (returned by expose); default: public. "
        "Not with enable_tcp_proxy: raw TCP carries no token to check.",
    )
    privileged: StrictBool = False
    runtime: StrictStr | None = Field(
        None,
        description="Isolation: crun (a container on the host's kernel) or gvisor (gVisor's "
        "user-space kernel between the code and the host's). Default: the server's "
        "(`sandlot server --runtime`, itself crun by default).",
    )
    registry_secret: StrictStr | None = None
    delete_after_delay: TimerSeconds | None = None
    delete_after_inactivity_delay: TimerSeconds | None = None
    enable_light_sleep: StrictBool = False
    labels: dict[StrictStr, StrictStr] | None = None
    block_network: StrictBool | None = Field(
        None, description="False: full outbound access. Default (and True): no network at all."
    )
    outbound_allowlist: list[StrictStr] | None = Field(
        None, description="Outbound access to these addresses/CIDRs only (bare IPs: /32, /128)."
    )
    snapshot: StrictStr | None = Field(
        None,
        description="Start from this snapshot's filesystem (its id); the image is the "
        "snapshot's, so image must be omitted or the same.",
    )
    sandbox_secret: StrictStr | None = Field(
        None,
        pattern=r"^[\x21-\x7e]{16,512}$",
        description="The agent's bearer secret, chosen by the caller (16-512 printable ASCII "
        "characters, no spaces); default: one derived by the server.",
    )
    command: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="The sandbox's main process, a sh -c line (Koyeb's entrypoint/command/args "
        "joined by the SDK), started beside the agent and restarted whenever it ends.",
    )
    deep_sleep_value: TimerSeconds | None = Field(
        None,
        description="With enable_light_sleep: seconds asleep (light) before deep sleep; "
        "default 3900 (Koyeb's _experimental_deep_sleep_value).",
    )

    @model_validator(mode="after")
    def _egress(self) -> CreateSandbox:
        resolve_policy(self.block_network, self.outbound_allowlist)  # raises on bad input
        return self

    @model_validator(mode="after")
    def _tcp_proxy_unprotected(self) -> CreateSandbox:
        # A raw TCP connection has no place for a port token (the protocol is the sandbox's
        # own), so the proxy would serve protected ports to anyone: refused, not ignored.
        if self.enable_tcp_proxy and self.protect_ports:
            raise ValueError(
                "enable_tcp_proxy cannot be combined with protect_ports: the TCP proxy relays "
                "raw bytes and cannot check a port token; use the HTTP forms of exposed ports"
            )
        return self

    @field_validator("instance_type")
    @classmethod
    def _known_instance_type(cls, value: str) -> str:
        if value not in INSTANCE_TYPES:
            raise ValueError(
                f"unknown instance_type {value!r}; expected one of: {', '.join(INSTANCE_TYPES)}"
            )
        return value

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str | None) -> str | None:
        if value is not None and value not in RUNTIMES:
            raise ValueError(f"unknown runtime {value!r}; expected one of: {', '.join(RUNTIMES)}")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, v in (value or {}).items():
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"invalid environment variable name {key!r}")
            if key in RESERVED_ENV:
                raise ValueError(f"environment variable {key!r} is reserved for sandlot's agent")
            if "\0" in v:
                raise ValueError(f"environment variable {key!r} contains a NUL byte")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _check_labels(value)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise ValueError(f"image must be a non-empty name without spaces, not {value!r}")
        return value


class UpdateSandbox(_Strict):
    """Lifecycle fields (and labels). Omitted fields are unchanged; ``null`` clears a delay."""

    idle_timeout: TimerSeconds | None = None
    delete_after_delay: TimerSeconds | None = None
    delete_after_inactivity_delay: TimerSeconds | None = None
    enable_light_sleep: StrictBool | None = None
    labels: dict[StrictStr, StrictStr] | None = None
    block_network: StrictBool | None = None
    outbound_allowlist: list[StrictStr] | None = None

    @model_validator(mode="after")
    def _egress(self) -> UpdateSandbox:
        resolve_policy(self.block_network, self.outbound_allowlist)
        return self

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _check_labels(value)


class SandboxOut(BaseModel):
    id: str
    name: str
    status: Literal["creating", "running", "paused", "sleeping", "error", "deleted"]
    sleep_kind: Literal["light", "deep"] | None = Field(
        None,
        description="While sleeping: light (frozen, memory kept) or deep (processes ended, "
        "filesystem kept; background processes are lost).",
    )
    last_activity_at: str | None = None
    image: str
    instance_type: str
    region: str
    created_at: str
    updated_at: str
    labels: dict[str, str]
    env: dict[str, str]
    sandbox_url: str
    domain: str
    privileged: bool
    runtime: str = RUNTIMES[0]
    exposed_port_protocol: str
    enable_tcp_proxy: bool
    idle_timeout: int
    delete_after_delay: int | None
    delete_after_inactivity_delay: int | None
    enable_light_sleep: bool
    network: Literal["none", "outbound"] = "none"
    outbound_allowlist: list[str] | None = None
    error: str = ""
    secret: str | None = Field(None, description="Present on create and get; absent from list.")
    command: str | None = Field(None, description="Its main process, if it has one.")
    snapshot: str | None = Field(None, description="The snapshot it was spawned from.")


class SandboxList(BaseModel):
    sandboxes: list[SandboxOut]


SnapshotTypeName = Literal["filesystem", "full"]


class CreateSnapshot(_Strict):
    name: StrictStr = Field(..., pattern=NAME_PATTERN)
    snapshot_type: SnapshotTypeName = Field(
        "filesystem",
        description="filesystem: the sandbox's file changes; full: also its memory and "
        "processes (needs a runtime that can checkpoint: gvisor).",
    )
    labels: dict[StrictStr, StrictStr] | None = None
    wait_available: StrictBool = Field(
        True, description="Answer once the snapshot is available (else while it is creating)."
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _check_labels(value)


class SnapshotOut(BaseModel):
    id: str
    name: str
    sandbox_id: str = Field(..., description="The sandbox it was taken of.")
    snapshot_type: SnapshotTypeName
    status: Literal["creating", "available", "failed", "deleting", "deleted"]
    image: str = Field(..., description="The image its layer stacks on.")
    region: str
    project_id: str
    labels: dict[str, str]
    created_at: str
    available_at: str | None = None
    size: int | None = Field(None, description="Bytes its own layer takes on disk.")
    messages: list[str]


class SnapshotList(BaseModel):
    snapshots: list[SnapshotOut]


class ForkSandbox(_Strict):
    n: int = Field(1, ge=1, le=16, description="How many sandboxes to start (1-16).")
    wait_ready: StrictBool = True
    timeout: NonNegativeSeconds = Field(300, description="Seconds to wait for readiness.")


class EventOut(BaseModel):
    at: str
    kind: str
    detail: str


class EventList(BaseModel):
    events: list[EventOut]


class DeletedOut(BaseModel):
    id: str
    status: Literal["deleted"]


#: What a token may do besides its project's sandboxes: see db.Scope.
TokenScope = Literal["normal", "privileged", "admin"]


class CreateToken(_Strict):
    project: StrictStr = Field(..., pattern=PROJECT_PATTERN)
    name: StrictStr = Field("", max_length=128)
    scope: TokenScope = Field(
        "normal",
        description="normal: the project's sandboxes; privileged: also privileged sandboxes; "
        "admin: also tokens and quotas of every project.",
    )


class TokenOut(BaseModel):
    id: str
    project: str
    name: str
    scope: TokenScope = "normal"
    created_at: str
    revoked_at: str | None = None
    token: str | None = Field(None, description="The token itself: shown once, at creation.")


class TokenList(BaseModel):
    tokens: list[TokenOut]


class SetQuota(_Strict):
    """A project's limits; an omitted field is unchanged, ``null`` makes it unlimited. Sizes are
    the sum over the project's sandboxes (sleeping ones too) of their instance types'."""

    max_sandboxes: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    memory_mb: Annotated[int, Field(ge=0, le=1 << 40)] | None = None
    vcpu: Annotated[float, Field(ge=0, le=1_000_000)] | None = None
    disk_mb: Annotated[int, Field(ge=0, le=1 << 40)] | None = None

    @field_validator("vcpu", mode="before")
    @classmethod
    def _vcpu_number(cls, value: object) -> object:
        # strict mode refuses an int for a float; 4 vCPUs is a fine way to say 4.0
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def limits(self) -> dict[str, int | float | None]:
        return self.model_dump(exclude_unset=True)


class QuotaUsage(BaseModel):
    sandboxes: int
    memory_mb: int
    vcpu: float
    disk_mb: int


class QuotaOut(BaseModel):
    project: str
    max_sandboxes: int | None = Field(None, description="null: unlimited (same below)")
    memory_mb: int | None = None
    vcpu: float | None = None
    disk_mb: int | None = None
    usage: QuotaUsage


class QuotaList(BaseModel):
    quotas: list[QuotaOut]


class CreateSecret(_Strict):
    """A registry secret: what ``registry_secret=NAME`` pulls a private image with."""

    name: StrictStr = Field(..., pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    type: Literal["registry"] = "registry"
    registry: StrictStr = Field(
        ...,
        description="The registry's host[:port] (docker.io for Docker Hub); the credentials "
        "are sent there and nowhere else.",
    )
    username: StrictStr = Field(..., min_length=1, max_length=255)
    password: StrictStr = Field(..., min_length=1, max_length=8192)

    @field_validator("registry")
    @classmethod
    def _registry(cls, value: str) -> str:
        from sandlot.images.store import is_registry_host

        host = value.strip().lower().removeprefix("https://").removeprefix("http://").rstrip("/")
        if not is_registry_host(host):
            raise ValueError(
                f"registry must be a registry host such as ghcr.io, docker.io or "
                f"localhost:5000, not {value!r}"
            )
        return host

    @field_validator("username", "password")
    @classmethod
    def _printable(cls, value: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must not contain control characters")
        return value


class SecretOut(BaseModel):
    name: str
    type: Literal["registry"]
    registry: str
    username: str
    created_at: str


class SecretList(BaseModel):
    secrets: list[SecretOut]


class ErrorOut(BaseModel):
    error: str
    code: str
    detail: list[dict[str, object]] | None = None


class HealthOut(BaseModel):
    status: Literal["ok"]
    version: str
    regions: list[str]
    #: On the Unix socket only (its users are the server's own): which installation and build
    #: of sandlot serves, and its pid -- so the SDK can restart a local server it outdated.
    build: str | None = None
    package: str | None = None
    pid: int | None = None


# -- exposed ports --


class ExposePort(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    port: StrictInt = Field(..., ge=1, le=65535)
    exclusive: StrictBool = Field(
        False,
        description="Koyeb's semantics: fail with 409 if another port is already exposed "
        "(default: sandlot's, several ports at once).",
    )


class ExposedPortOut(BaseModel):
    port: int
    exposed_at: str = Field(..., description="Path form URL: {server}/sandboxes/{id}/ports/{port}/")
    host_url: str | None = Field(
        None, description="Host form URL ({port}-{id}.{domain}) when the server has --domain."
    )
    protocol: str
    token: str | None = Field(None, description="With protect_ports: this port's token.")
    since: str


class TcpProxyOut(BaseModel):
    host: str
    port: int


class PortsOut(BaseModel):
    ports: list[ExposedPortOut]
    tcp_proxy: TcpProxyOut | None = None
    domain: str = Field(..., description="Where ports are served: the wildcard domain or server.")


class UnexposedOut(BaseModel):
    unexposed: list[int]
    ports: list[int]
