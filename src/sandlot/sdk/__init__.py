"""The Python SDK: the Koyeb Sandbox SDK's API for sandlot, sync and async.

``Sandbox`` (sync) is generated from ``AsyncSandbox`` (async, ``_async/``) by
``scripts/unasync.py``: one implementation, two faces.
"""

from sandlot.sdk._async.sandbox import AsyncExecStream, AsyncFilesystem, AsyncSandbox
from sandlot.sdk._common import (
    CancelToken,
    CommandCancelledError,
    CommandResult,
    CommandStatus,
    EndEvent,
    ExitEvent,
    FileContent,
    ProcessInfo,
    StderrEvent,
    StdoutEvent,
    StreamEvent,
)
from sandlot.sdk._sync.sandbox import ExecStream, Filesystem, Sandbox
from sandlot.sdk.errors import (
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
    UnsupportedFeatureError,
)

__all__ = [
    "AsyncExecStream",
    "AsyncFilesystem",
    "AsyncSandbox",
    "CancelToken",
    "CommandCancelledError",
    "CommandResult",
    "CommandStatus",
    "EndEvent",
    "ExecStream",
    "ExitEvent",
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
    "StderrEvent",
    "StdoutEvent",
    "StreamEvent",
    "UnsupportedFeatureError",
]
