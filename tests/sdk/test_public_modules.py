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


def test_the_error_tree_is_koyebs_where_both_name_a_class() -> None:
    """Code written against Koyeb's SDK catches the same errors here: a 5xx is a
    SandboxServiceError, which ``except SandboxRequestError`` also catches (Koyeb's tree)."""
    from koyeb.sandbox import errors as koyeb_errors

    for name in errors.__all__:
        ours, theirs = getattr(errors, name), getattr(koyeb_errors, name, None)
        if not isinstance(theirs, type):
            continue
        for base in theirs.__mro__[1:]:
            if base.__module__ == koyeb_errors.__name__:
                assert issubclass(ours, getattr(errors, base.__name__)), (name, base.__name__)
    failure = errors.SandboxServiceError("down", 503)
    assert isinstance(failure, errors.SandboxRequestError) and failure.status_code == 503
    assert errors.SandboxServiceError("unreachable").status_code is None


def test_top_level_names() -> None:
    """``from sandlot import X`` for every name in ``sandlot.__all__``, lazily loaded."""
    import sandlot

    for name in sandlot.__all__:
        assert getattr(sandlot, name) is not None, name
    assert sandlot.CommandCancelledError is errors.CommandCancelledError
    assert sandlot.ControlClient is sdk.ControlClient
