"""The SDK's exceptions: the Koyeb Sandbox SDK's names, under one root.

Hierarchy::

    SandboxError
    ├── MissingApiTokenError (also ValueError)   a remote server needs an API token
    ├── InvalidPortError (also ValueError)       a port that is not an int in 1..65535
    ├── SandboxTimeoutError                      readiness, a command or a request timed out
    ├── NoSandboxSecretError                     a handle without the sandbox secret (from list())
    ├── SandboxRequestError                      the server or agent answered 4xx or 5xx
    │   ├── SandboxNotFoundError                 ... 404: no such sandbox (or not yours)
    │   ├── SandboxFileTooLargeError             ... 413: a read passed its max_bytes
    │   └── SandboxServiceError                  ... 5xx, or the server/agent cannot be reached
    ├── SandboxCommandError                      exec(..., raise_on_error=True) and code != 0
    │   └── TemplateBuildError                   ... a template's step failed (build())
    ├── CommandCancelledError                    a CancelToken stopped exec / wait_ready
    └── UnsupportedFeatureError                  an option/method a later release completes
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CommandCancelledError",
    "InvalidPortError",
    "MissingApiTokenError",
    "NoSandboxSecretError",
    "SandboxCommandError",
    "SandboxError",
    "SandboxFileTooLargeError",
    "SandboxNotFoundError",
    "SandboxRequestError",
    "SandboxServiceError",
    "SandboxTimeoutError",
    "TemplateBuildError",
    "UnsupportedFeatureError",
]


class SandboxError(Exception):
    """Root of every error the SDK raises."""


class MissingApiTokenError(SandboxError, ValueError):
    """A remote (TCP) sandlot server needs an API token: pass ``api_token=`` or set
    ``SANDLOT_API_TOKEN``."""


class InvalidPortError(SandboxError, ValueError):
    """A port must be an ``int`` in 1..65535."""


class SandboxTimeoutError(SandboxError):
    """Waiting for readiness, a command or a request took longer than its timeout."""


class NoSandboxSecretError(SandboxError):
    """This handle has no sandbox secret (handles from ``list()`` do not); use ``get_from_id``."""


class SandboxRequestError(SandboxError):
    """The server or the sandbox's agent rejected the request (HTTP 4xx), or failed
    (:class:`SandboxServiceError`, a subclass, as in Koyeb's SDK: ``except
    SandboxRequestError`` catches every failed request)."""

    def __init__(self, message: str, status_code: int | None, body: Any = None) -> None:
        super().__init__(message)
        #: The HTTP status; None only for a :class:`SandboxServiceError` with no answer at all.
        self.status_code = status_code
        self.body = body


class SandboxNotFoundError(SandboxRequestError):
    """No sandbox with this id exists for your API token's project (or it was deleted)."""


class SandboxFileTooLargeError(SandboxRequestError):
    """A file read from a sandbox passed the read's ``max_bytes`` (sandlot): the read stopped
    there, so an endless file (``/proc/self/pagemap``, ``/dev/zero`` behind a symlink) cannot
    grow the client without bound. ``limit`` is the limit that was passed."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message, 413)
        self.limit = limit


class SandboxServiceError(SandboxRequestError):
    """The server or the agent failed (HTTP 5xx) or could not be reached (``status_code``
    None)."""

    def __init__(self, message: str, status_code: int | None = None, body: Any = None) -> None:
        super().__init__(message, status_code, body)


class SandboxCommandError(SandboxError):
    """A command exited with a non-zero code and ``raise_on_error=True`` was given."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class TemplateBuildError(SandboxCommandError):
    """A template's step failed (``Sandbox.template(...).build()``): ``step`` (its number,
    from 1), ``command``, ``exit_code``, and ``result`` (the step's ``CommandResult``); the
    message holds the end of its output."""

    #: How much of each output stream the message keeps (its end).
    OUTPUT_TAIL = 4000

    def __init__(self, step: int, command: str, result: Any) -> None:
        self.step, self.command, self.exit_code = step, command, int(result.exit_code)
        out, err = result.stdout[-self.OUTPUT_TAIL :], result.stderr[-self.OUTPUT_TAIL :]
        super().__init__(
            f"template step {step} failed with exit code {self.exit_code}: {command}\n"
            f"stdout:\n{out}\nstderr:\n{err}",
            result,
        )


class CommandCancelledError(SandboxError):
    """``exec`` (or ``wait_ready``) was cancelled through its ``CancelToken``; a command was
    killed. Like every SDK error, ``except SandboxError`` catches it."""


class UnsupportedFeatureError(SandboxError):
    """An option or method this version of sandlot does not support yet. The message says
    which; nothing was done."""
