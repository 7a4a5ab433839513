"""The Python SDK: the Koyeb Sandbox SDK's API for sandlot, sync and async.

``Sandbox`` (sync) is generated from ``AsyncSandbox`` (async, ``_async/``) by
``scripts/unasync.py``: one implementation, two faces. The public modules: this one,
:mod:`sandlot.sdk.types` (results, events, the cancel token, the control API's answers),
:mod:`sandlot.sdk.errors` (the exception tree) and :mod:`sandlot.sdk.control` (tokens,
quotas, secrets, health). Modules whose names start with ``_`` are not an API.
"""

from sandlot.sdk._async import (
    AsyncExecStream,
    AsyncFilesystem,
    AsyncSandbox,
    AsyncSnapshot,
    AsyncSnapshotTemplate,
)
from sandlot.sdk._sync import ExecStream, Filesystem, Sandbox, Snapshot, SnapshotTemplate
from sandlot.sdk.control import AsyncControlClient, ControlClient
from sandlot.sdk.errors import (
    CommandCancelledError,
    InvalidPortError,
    MissingApiTokenError,
    NoSandboxSecretError,
    SandboxCommandError,
    SandboxError,
    SandboxFileTooLargeError,
    SandboxNotFoundError,
    SandboxRequestError,
    SandboxServiceError,
    SandboxTimeoutError,
    TemplateBuildError,
    UnsupportedFeatureError,
)
from sandlot.sdk.types import (
    CancelToken,
    CommandResult,
    CommandStatus,
    EndEvent,
    ExitEvent,
    ExposedPort,
    FileContent,
    ProcessInfo,
    SnapshotStatus,
    SnapshotType,
    StderrEvent,
    StdoutEvent,
    StreamEvent,
)

__all__ = [
    "AsyncControlClient",
    "AsyncExecStream",
    "AsyncFilesystem",
    "AsyncSandbox",
    "AsyncSnapshot",
    "AsyncSnapshotTemplate",
    "CancelToken",
    "CommandCancelledError",
    "CommandResult",
    "CommandStatus",
    "ControlClient",
    "EndEvent",
    "ExecStream",
    "ExitEvent",
    "ExposedPort",
    "FileContent",
    "Filesystem",
    "InvalidPortError",
    "MissingApiTokenError",
    "NoSandboxSecretError",
    "ProcessInfo",
    "Sandbox",
    "SandboxCommandError",
    "SandboxError",
    "SandboxFileTooLargeError",
    "SandboxNotFoundError",
    "SandboxRequestError",
    "SandboxServiceError",
    "SandboxTimeoutError",
    "Snapshot",
    "SnapshotStatus",
    "SnapshotTemplate",
    "SnapshotType",
    "StderrEvent",
    "StdoutEvent",
    "StreamEvent",
    "TemplateBuildError",
    "UnsupportedFeatureError",
]
