"""The SDK's public result and event types: what ``exec``, ``exec_stream``,
``list_processes`` and ``read_file`` return, the :class:`CancelToken` they take, and the
control API's answers (:mod:`sandlot.sdk.control`).

Import them from here or from :mod:`sandlot.sdk` (the same objects); the Koyeb SDK's names
(``CommandResult``, ``CommandStatus``, ``ProcessInfo``) are kept.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypedDict

__all__ = [
    "EVENT_NAMES",
    "CancelToken",
    "CommandResult",
    "CommandStatus",
    "ConfigFile",
    "EndEvent",
    "ExitEvent",
    "ExposedPort",
    "FileContent",
    "Listener",
    "ProcessInfo",
    "QuotaInfo",
    "QuotaUsage",
    "SandboxEvent",
    "SecretInfo",
    "ServerHealth",
    "SnapshotStatus",
    "SnapshotType",
    "StderrEvent",
    "StdoutEvent",
    "StreamEvent",
    "TokenInfo",
]

# -- commands -----------------------------------------------------------------------------------


class CommandStatus(enum.StrEnum):
    FINISHED = "finished"
    FAILED = "failed"


@dataclasses.dataclass
class CommandResult:
    """What ``exec`` returns: ``stdout``, ``stderr`` and ``code`` (also ``exit_code``)."""

    stdout: str
    stderr: str
    exit_code: int
    command: str = ""
    duration: float = 0.0
    #: The signal that killed the command, when one did (e.g. "SIGKILL").
    signal: str | None = None
    #: Bytes of output this result does not hold (sandlot): past ``max_output_bytes`` the
    #: command keeps running and its output is counted, not kept. ``stdout`` is then the first
    #: ``max_output_bytes`` (cut at a character boundary) and ``stdout_dropped_bytes`` the rest.
    stdout_dropped_bytes: int = 0
    stderr_dropped_bytes: int = 0

    @property
    def code(self) -> int:
        return self.exit_code

    @property
    def truncated(self) -> bool:
        """Whether some output is missing from ``stdout``/``stderr`` (see the dropped counts)."""
        return bool(self.stdout_dropped_bytes or self.stderr_dropped_bytes)

    @property
    def status(self) -> CommandStatus:
        return CommandStatus.FINISHED if self.exit_code == 0 else CommandStatus.FAILED

    @property
    def success(self) -> bool:
        return self.exit_code == 0


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One event of ``exec_stream``. ``type`` is ``stdout``, ``stderr``, ``exit`` or ``end``;
    ``data`` is the seed's payload (``{"data": text}`` for output, ``{"code": n}`` for exit)."""

    type: str
    data: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StdoutEvent(StreamEvent):
    @property
    def text(self) -> str:
        return str(self.data["data"])


@dataclasses.dataclass(frozen=True)
class StderrEvent(StreamEvent):
    @property
    def text(self) -> str:
        return str(self.data["data"])


@dataclasses.dataclass(frozen=True)
class ExitEvent(StreamEvent):
    @property
    def code(self) -> int:
        return int(self.data["code"])


@dataclasses.dataclass(frozen=True)
class EndEvent(StreamEvent):
    pass


#: The events an exec stream sends.
EVENT_NAMES = ("stdout", "stderr", "exit", "end")


#: An exec stream's event listener.
Listener = Callable[[StreamEvent], Any]


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    id: str
    pid: int | None
    status: str
    command: str
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)


@dataclasses.dataclass(frozen=True)
class ExposedPort(Mapping[str, Any]):
    """``expose_port``'s result, as the Koyeb SDK returns it (``exposed.port``,
    ``exposed.exposed_at``) with sandlot's own fields: ``host_url`` (with a server ``--domain``),
    ``protocol``, ``token`` (with ``protect_ports``) and ``since``. It is also a read-only
    mapping (``exposed["exposed_at"]``), the shape sandlot answered before and the JS SDK's
    ``{ port, exposed_at }``."""

    port: int
    exposed_at: str
    host_url: str | None = None
    protocol: str = "http"
    token: str | None = None
    since: str = ""

    @classmethod
    def from_answer(cls, data: Any) -> ExposedPort:
        """From the server's JSON; a malformed answer is a ``ValueError`` naming the field."""
        if not isinstance(data, dict):
            raise ValueError("an exposed port is not a JSON object")
        port, exposed_at = data.get("port"), data.get("exposed_at")
        if type(port) is not int or not 1 <= port <= 65535:
            raise ValueError(f"an exposed port's port is not 1-65535: {port!r:.40}")
        if not isinstance(exposed_at, str):
            raise ValueError("an exposed port has no exposed_at URL")
        optional = {k: data.get(k) for k in ("host_url", "token")}
        for key, value in optional.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"an exposed port's {key} is not a string")
        protocol, since = data.get("protocol") or "http", data.get("since") or ""
        if not isinstance(protocol, str) or not isinstance(since, str):
            raise ValueError("an exposed port's protocol or since is not a string")
        return cls(port, exposed_at, optional["host_url"], protocol, optional["token"], since)

    def __getitem__(self, key: str) -> Any:
        if key not in _EXPOSED_PORT_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_EXPOSED_PORT_FIELDS)

    def __len__(self) -> int:
        return len(_EXPOSED_PORT_FIELDS)


_EXPOSED_PORT_FIELDS = tuple(f.name for f in dataclasses.fields(ExposedPort))


@dataclasses.dataclass(frozen=True)
class FileContent:
    """``read_file``'s result: ``content`` (text, or base64 text if ``encoding == "base64"``)."""

    content: str
    encoding: str = "utf-8"

    @property
    def bytes(self) -> bytes:
        if self.encoding == "base64":
            return base64.b64decode(self.content)
        return self.content.encode("utf-8")


class CancelToken:
    """Python's AbortSignal: pass it as ``exec(..., cancel=token)`` and call :meth:`cancel` from
    anywhere (another thread or task) to kill the command. A token can be shared by several
    commands and stays cancelled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._callbacks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def _subscribe(self, cb: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(cb)

                def unsubscribe() -> None:
                    with self._lock:
                        if cb in self._callbacks:
                            self._callbacks.remove(cb)

                return unsubscribe
        cb()
        return lambda: None


# -- the control API's answers (sandlot.sdk.control) --------------------------------------------
# TypedDicts: the server's JSON as it comes (``json.dumps`` gives it back unchanged), typed.


class SandboxEvent(TypedDict):
    """One entry of a sandbox's history (``created``, ``slept``, ``woke``, ``deleted``...)."""

    at: str
    kind: str
    detail: str


class TokenInfo(TypedDict, total=False):
    """An API token; ``token`` (the secret itself) only in the answer that created it."""

    id: str
    project: str
    name: str
    scope: str
    created_at: str
    revoked_at: str | None
    token: str | None


class QuotaUsage(TypedDict):
    """What a project uses now (every sandbox counts, asleep too)."""

    sandboxes: int
    memory_mb: int
    vcpu: float
    disk_mb: int


class QuotaInfo(TypedDict):
    """A project's limits (None: unlimited) and its usage."""

    project: str
    max_sandboxes: int | None
    memory_mb: int | None
    vcpu: float | None
    disk_mb: int | None
    usage: QuotaUsage


class SecretInfo(TypedDict):
    """A registry secret (never its password)."""

    name: str
    type: str
    registry: str
    username: str
    created_at: str


class ServerHealth(TypedDict, total=False):
    """``GET /v1/health``: ``status``, ``version`` and ``regions``; on the Unix socket also
    which installation (``package``), ``build`` and ``pid`` serve."""

    status: str
    version: str
    regions: list[str]
    build: str | None
    package: str | None
    pid: int | None


# -- snapshots ----------------------------------------------------------------------------------


class SnapshotType(enum.Enum):
    """Koyeb's snapshot types: the filesystem's changes, or also memory and processes."""

    FILESYSTEM = "filesystem"
    FULL = "full"


class SnapshotStatus(enum.Enum):
    """Koyeb's snapshot statuses (sandlot's go creating -> available or failed -> deleted)."""

    INVALID = "invalid"
    CREATING = "creating"
    UPLOADING = "uploading"
    AVAILABLE = "available"
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """A file written into a new sandbox (``create(config_files={path: ConfigFile(...)})``,
    Koyeb's name): its content and its permissions (octal, default ``"0644"``)."""

    content: str | bytes
    permissions: str = "0644"
