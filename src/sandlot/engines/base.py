"""The engine interface: what the server needs from anything that runs sandboxes.

The local engine (crun on this machine) is the default; the kubernetes engine (Pods on a cluster,
engines/kubernetes) implements the same interface. Two optional attributes tell the server more:
``can_freeze = False`` (no light sleep: it sleeps deep instead) and ``exclusive = True`` (the
engine's sandboxes all belong to this server's store: reconcile removes those without a row).
Engines know nothing of API tokens, projects or lifecycle timers -- that is the
server's business -- they only turn a :class:`SandboxSpec` into an isolated, running sandbox whose
agent answers at :attr:`SandboxInfo.agent_address`.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from sandlot.instance_types import InstanceType


class EngineError(Exception):
    """Base class of engine failures; the message is meant for the user."""


class SandboxNotFound(EngineError):
    """The engine has no sandbox with this id."""


class ImageError(EngineError):
    """The image cannot be found, pulled or used (e.g. it has no /bin/sh)."""


class EngineUnavailableError(EngineError):
    """The engine cannot run on this host (missing runtime, not root, unsupported kernel)."""


class InsufficientResources(EngineError):
    """The host has not enough left of ``resource`` for this sandbox ("disk", "memory",
    "pids", "file handles"): a create refused at admission, or one that ran out of disk."""

    def __init__(self, resource: str, message: str) -> None:
        super().__init__(message)
        self.resource = resource


class NetworkMode(enum.StrEnum):
    #: Loopback only. The default: untrusted code reaches nothing.
    NONE = "none"
    #: Outbound access through user-mode networking; the host's loopback stays unreachable.
    OUTBOUND = "outbound"


class SandboxState(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"


@dataclass(frozen=True)
class SandboxSpec:
    """Everything an engine needs to create one sandbox."""

    id: str
    image: str
    instance_type: InstanceType
    #: The agent's bearer secret (the gateway forwards the client's token; the agent checks it).
    secret: str
    env: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None
    privileged: bool = False
    network: NetworkMode = NetworkMode.NONE
    #: With ``NetworkMode.OUTBOUND``: the networks (CIDRs) it may reach; None: everywhere.
    outbound_allowlist: tuple[str, ...] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    #: A warm-pool sandbox: started without a secret, its agent in pool mode -- the first
    #: authenticated request claims it and its bearer token becomes the secret (kept across
    #: restarts of the agent). ``secret`` is ignored.
    pool: bool = False
    #: Credentials for the image's registry (a private image), or None.
    registry_auth: RegistryAuth | None = None
    #: The isolation runtime, one of :data:`RUNTIMES`: ``crun`` (a container on the host's
    #: kernel) or ``gvisor`` (runsc: a user-space kernel between the code and the host's).
    runtime: str = "crun"
    #: Start from this filesystem snapshot (its layers over its image; ``image`` is then the
    #: snapshot's base image, for the record), or None.
    snapshot: str | None = None
    #: The sandbox's main process (Koyeb's entrypoint/command/args as one ``sh -c`` line),
    #: started and restarted by its agent; None: none.
    command: str | None = None
    #: The project the sandbox belongs to ("" for a warm-pool sandbox not yet claimed): an
    #: engine may record it (the kubernetes engine's spec annotation); it decides nothing.
    project: str = ""


#: The runtimes a sandbox may ask for; the first is the default.
RUNTIMES = ("crun", "gvisor")


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials for pulling a sandbox's image from a private registry (``registry_secret``).
    ``registry`` is the host (``[host][:port]``, ``docker.io`` for Docker Hub) they are for:
    they are never sent anywhere else."""

    registry: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class AgentAddress:
    """Where a sandbox's agent listens: a Unix socket path on this host, or host:port."""

    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        if (self.unix_path is None) == (self.host is None):
            raise ValueError("AgentAddress needs exactly one of unix_path or host/port")


@dataclass(frozen=True)
class SandboxInfo:
    id: str
    state: SandboxState
    agent_address: AgentAddress
    #: Pid of the sandbox's init process on the host, when the engine has one.
    pid: int | None = None
    detail: str = ""


class UnsupportedFeature(EngineError):
    """What was asked is not something this engine or runtime can do (the message says which
    can)."""


@dataclass(frozen=True)
class SnapshotInfo:
    """A filesystem snapshot an engine made: its size on disk and notes for the user (what
    was left out of it, whether its layers were flattened)."""

    id: str
    size: int
    messages: tuple[str, ...] = ()


@runtime_checkable
class Snapshotter(Protocol):
    """Engines that keep filesystem snapshots (the local engine); others answer that they
    have none."""

    async def snapshot(self, sandbox_id: str, snapshot_id: str) -> SnapshotInfo:
        """Copy the sandbox's filesystem changes into a new snapshot ``snapshot_id``."""
        ...

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Remove a snapshot; refused while a sandbox or another snapshot uses it."""
        ...


class Engine(Protocol):
    """What the server calls. All methods are safe to call concurrently for different ids, and
    ``delete`` is idempotent and safe to call concurrently with itself and with ``create``."""

    name: str

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        """Create and start a sandbox. Returns once its agent process runs (health is polled by
        the caller). On failure nothing is left behind."""
        ...

    async def delete(self, sandbox_id: str) -> None:
        """Kill every process and remove mounts, cgroups and files. No error if already gone."""
        ...

    async def pause(self, sandbox_id: str) -> None:
        """Light sleep: freeze every process (memory kept, no CPU)."""
        ...

    async def resume(self, sandbox_id: str) -> None: ...

    async def set_network(
        self, sandbox_id: str, mode: NetworkMode, outbound_allowlist: tuple[str, ...] | None
    ) -> None:
        """Change a sandbox's egress policy, live."""
        ...

    async def stop(self, sandbox_id: str) -> str | None:
        """Deep sleep: release the sandbox's memory and keep its filesystem. Its processes end,
        unless the engine can save them with their memory (the local engine's gVisor
        sandboxes: ``start`` brings them back); it then says what it kept (for the sandbox's
        events), else None."""
        ...

    async def start(self, sandbox_id: str) -> SandboxInfo:
        """Start a stopped sandbox again on its kept filesystem."""
        ...

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        """Raise :class:`SandboxNotFound` if the engine does not know the id."""
        ...

    async def list(self) -> list[SandboxInfo]:
        """Every sandbox the engine holds, including ones created before a restart."""
        ...

    async def recover(self) -> builtins.list[str]:
        """At server start: remove what a crash left half-made (partial sandboxes, orphaned
        mounts or cgroups); return the ids removed. Healthy sandboxes are left running."""
        ...

    async def close(self) -> None:
        """Release engine resources (not the sandboxes: they outlive the server)."""
        ...
