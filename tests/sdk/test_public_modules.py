"""The SDK's public surface: result types live in a public module (``sandlot.sdk.types``),
re-exported by ``sandlot.sdk`` as the same objects, and every exception -- the cancel one
too -- is in the documented tree under ``SandboxError`` (``sandlot.sdk.errors``)."""

from __future__ import annotations

import sandlot.sdk as sdk
from sandlot.sdk import errors, types


def test_types_are_reexported_as_the_same_objects() -> None:
    for name in types.__all__:
        if hasattr(sdk, name):
            assert getattr(sdk, name) is getattr(types, name), name
    for name in ("CommandResult", "CommandStatus", "ProcessInfo", "CancelToken", "StdoutEvent"):
        assert name in sdk.__all__ and getattr(sdk, name) is getattr(types, name)


def test_command_cancelled_is_in_the_documented_tree() -> None:
    assert sdk.CommandCancelledError is errors.CommandCancelledError
    assert issubclass(errors.CommandCancelledError, errors.SandboxError)
    assert "CommandCancelledError" in errors.__all__
    assert "CommandCancelledError" in (errors.__doc__ or "")


def test_every_sdk_error_is_a_sandbox_error() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.SandboxError), name


def test_top_level_names() -> None:
    """``from sandlot import X`` for every name in ``sandlot.__all__``, lazily loaded."""
    import sandlot

    for name in sandlot.__all__:
        assert getattr(sandlot, name) is not None, name
    assert sandlot.CommandCancelledError is errors.CommandCancelledError
    assert sandlot.ControlClient is sdk.ControlClient
