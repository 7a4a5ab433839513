"""sandlot: secure, ephemeral sandboxes for untrusted code, with the Koyeb Sandbox SDK's API.

The public names are loaded lazily (PEP 562) so that ``python -m sandlot.agent`` -- which runs
inside every sandbox with nothing but the standard library -- never imports the SDK's
dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Sandbox": "sandlot.sdk",
    "AsyncSandbox": "sandlot.sdk",
    "ControlClient": "sandlot.sdk.control",
    "AsyncControlClient": "sandlot.sdk.control",
    "SandboxError": "sandlot.sdk.errors",
    "MissingApiTokenError": "sandlot.sdk.errors",
    "InvalidPortError": "sandlot.sdk.errors",
    "SandboxTimeoutError": "sandlot.sdk.errors",
    "NoSandboxSecretError": "sandlot.sdk.errors",
    "SandboxRequestError": "sandlot.sdk.errors",
    "SandboxServiceError": "sandlot.sdk.errors",
    "SandboxNotFoundError": "sandlot.sdk.errors",
    "SandboxCommandError": "sandlot.sdk.errors",
    "UnsupportedFeatureError": "sandlot.sdk.errors",
    "CommandCancelledError": "sandlot.sdk.errors",
    "SandboxFileTooLargeError": "sandlot.sdk.errors",
    "TemplateBuildError": "sandlot.sdk.errors",
    "Snapshot": "sandlot.sdk",
    "AsyncSnapshot": "sandlot.sdk",
    "SnapshotType": "sandlot.sdk.types",
    "ConfigFile": "sandlot.sdk.types",
    "SnapshotStatus": "sandlot.sdk.types",
}

__all__ = [
    "AsyncControlClient",
    "AsyncSandbox",
    "AsyncSnapshot",
    "CommandCancelledError",
    "ConfigFile",
    "ControlClient",
    "InvalidPortError",
    "MissingApiTokenError",
    "NoSandboxSecretError",
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
    "SnapshotType",
    "TemplateBuildError",
    "UnsupportedFeatureError",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover - names for type checkers only
    from sandlot.sdk import AsyncSandbox, AsyncSnapshot, Sandbox, Snapshot
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
    from sandlot.sdk.types import ConfigFile, SnapshotStatus, SnapshotType


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sandlot' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
